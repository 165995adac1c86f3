"""``fastckpt serve``: a machine-wide DRAM cache of checkpoints, handed out as sealed memfds.

One process, threads: an accept loop, one thread per client connection (bounded), and a small
pool that fills cache entries. A client connects to the Unix socket, says which checkpoint (a
root index and a relative name, never a path) and which generation (the identity it read), and
gets one memfd per partition holding the partition's bytes from file offset 0, sealed against
writes, shrinking and growing, so no client can change what others are served.

What keeps it safe and honest:
- peers are checked with ``SO_PEERCRED`` (the daemon's own uid, plus ``allow_uids`` /
  ``allow_gids``, the latter against the peer's primary gid); the socket's directory is created
  ``0700``, and one that others can write (a sticky one such as ``/tmp`` included) or that lies
  under a non-sticky one others can write is refused (``fastckpt.rules.peers``);
- every request is one size-limited frame, validated against a fixed schema
  (``fastckpt.serve.protocol``), that must arrive whole within ``idle_timeout_s``; anything
  malformed or late closes that connection and nothing else;
- the daemon reads only under its roots (names resolved with symlinks followed, every file of
  the checkpoint checked to lie under the root) and opens a checkpoint as a load does
  (``open_checkpoint``: beneath its directory, Hugging Face cache snapshots and single files
  included), filling from those very descriptors;
- entries are keyed by the checkpoint's identity (dev/inode/size/mtime/ctime of its files); each
  request re-stats the files, and a partition modified while it is read fails the fill, so two
  generations are never mixed;
- the store's budget holds; entries pinned by a live connection or being filled are never evicted;
  a connection pins the entries it was handed (never a key: another entry later filled under the
  same key is not its to unpin), only after its GET succeeded, and its pins go when it closes,
  however it closes (a client killed mid-load included).

Why one module of this size: connection handling, credentials and fills share the daemon's
store, locks and stats; the protocol, names and store are modules of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import socket
import stat
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastckpt.errors import FastckptError
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint
from fastckpt.rules import peers
from fastckpt.serve import names, protocol
from fastckpt.serve.store import LruStore

log = logging.getLogger("fastckpt.serve")

FILL_CHUNK = 16 << 20
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
PROGRESS_EVERY_S = 0.25


@dataclass
class ServeConfig:
    """Settings of one daemon.

    Attributes:
        socket_path: where the Unix socket is created.
        roots: directories whose checkpoints may be served (real paths are taken).
        dram_budget_bytes: bytes of checkpoint data the daemon may hold.
        allow_uids / allow_gids: peers allowed besides the daemon's own uid.
        verify: check chunk checksums (fastckpt checkpoints) while filling an entry.
        idle_timeout_s: a connection that sends no complete request for this long is closed.
        max_connections: connections served at once; further ones are closed at accept.
        fill_threads: checkpoints filled at once; read_threads: threads reading their bytes.
    """

    socket_path: str
    roots: list[str]
    dram_budget_bytes: int
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    verify: bool = True
    idle_timeout_s: float = 30.0
    max_connections: int = 64
    fill_threads: int = 2
    read_threads: int = 4


class ServeError(Exception):
    """A request that cannot be served; ``code`` is sent to the client."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


@dataclass
class Entry:
    """One checkpoint generation: a memfd per partition (filled once, then sealed)."""

    root: int
    name: str
    identity: str
    kind: str
    sizes: list[int]
    memfds: list[int] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    loaded: int = 0
    verified: bool = False
    closed: bool = False

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def close(self) -> None:
        self.closed = True
        fds, self.memfds = self.memfds, []
        protocol.close_fds(fds)


def _release(key: Hashable, entry: Entry) -> None:
    # An entry being filled is never released by LRU (it is pinned); a dropped one is closed by
    # its filler, which sees ``closed``.
    if entry.ready.is_set():
        entry.close()
    else:
        entry.closed = True


def prepare_socket_dir(path: str) -> None:
    """Create the socket's directory ``0700``, or check an existing one is safe to use: owned
    by this user (or root), writable by nobody else (a sticky world-writable directory such as
    ``/tmp`` is refused too: another user could bind the socket's name first), under
    directories that only their owners can rename things in (``fastckpt.rules.peers``)."""
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        peers.check_private_dir(parent, create=True)
    except peers.UnsafeLocationError as exc:
        raise ServeError("config", f"socket {path!r}: {exc}") from None
    except OSError as exc:
        raise ServeError("config", f"socket directory {parent!r}: {exc}") from None


def _clear_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError("config", f"{path!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left by a daemon that died
        return
    finally:
        probe.close()
    raise ServeError("config", f"another daemon is serving on {path!r}")


class Daemon:
    def __init__(self, cfg: ServeConfig) -> None:
        if not cfg.roots:
            raise ServeError("config", "at least one root directory is needed")
        roots = []
        for r in cfg.roots:
            real = os.path.realpath(r)
            if not os.path.isdir(real):
                raise ServeError("config", f"root {r!r} is not a directory")
            roots.append(real)
        self.cfg = cfg
        self.roots = roots
        self.store: LruStore[Entry] = LruStore(cfg.dram_budget_bytes, release=_release)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._readers = ThreadPoolExecutor(
            max(1, cfg.read_threads), thread_name_prefix="fastckpt-read"
        )
        self._fills = ThreadPoolExecutor(
            max(1, cfg.fill_threads), thread_name_prefix="fastckpt-fill"
        )
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._count_lock = threading.Lock()
        self.counters = dict.fromkeys(
            (
                "connections",
                "refused_peers",
                "protocol_errors",
                "requests",
                "fills",
                "fill_failures",
                "fill_bytes",
                "served_bytes",
                "stale",
            ),
            0,
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] += n

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> None:
        path = self.cfg.socket_path
        prepare_socket_dir(path)
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if self.cfg.allow_uids or self.cfg.allow_gids:
            os.chmod(path, 0o666)  # SO_PEERCRED decides; the directory's mode still applies
        sock.listen(64)
        sock.settimeout(0.2)
        self._listener = sock

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        log.info(
            "serving %s on %s, DRAM budget %d bytes, pid %d",
            ", ".join(self.roots),
            self.cfg.socket_path,
            self.cfg.dram_budget_bytes,
            os.getpid(),
        )
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    log.warning("accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                self._start_connection(conn)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.socket_path)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=2.0)
        self._fills.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True, cancel_futures=True)
        held = self.store.keys()
        for key in held:
            self.store.drop(key)
        log.info("stopped")

    # ------------------------------------------------------------------ connections
    def _start_connection(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._conns) >= self.cfg.max_connections:
                conn.close()
                log.warning("connection limit (%d) reached; closed a new one", len(self._conns))
                return
            self._conns.add(conn)
            t = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
            self._threads.add(t)
        t.start()

    def peer_allowed(self, uid: int, gid: int) -> bool:
        return uid == os.getuid() or uid in self.cfg.allow_uids or gid in self.cfg.allow_gids

    def _serve_connection(self, conn: socket.socket) -> None:
        pins: list[tuple[Hashable, Entry]] = []  # entries handed to this connection
        try:
            self._count("connections", 1)
            peer = peers.peer_credentials(conn)
            pid, uid, gid = peer.pid, peer.uid, peer.gid
            if not self.peer_allowed(uid, gid):
                self._count("refused_peers", 1)
                log.warning("refused peer pid %d uid %d gid %d (not allowed)", pid, uid, gid)
                with contextlib.suppress(OSError):
                    protocol.send(
                        conn, protocol.ERROR, {"code": "denied", "message": "not allowed"}
                    )
                return
            conn.settimeout(self.cfg.idle_timeout_s)
            reader = protocol.Reader(conn, accept_fds=False)
            while not self._stop.is_set():
                try:
                    # one deadline per request, not per receive: a peer trickling bytes is
                    # closed as surely as a silent one
                    msg = reader.read(deadline=time.monotonic() + self.cfg.idle_timeout_s)
                    protocol.validate_request(msg.kind, msg.fields)
                except protocol.PeerClosed:
                    return
                except protocol.ProtocolError as exc:
                    self._count("protocol_errors", 1)
                    log.warning("closing connection of pid %d: %s", pid, exc)
                    return
                self._count("requests", 1)
                try:
                    self._dispatch(conn, msg, pins)
                except ServeError as exc:
                    protocol.send(
                        conn, protocol.ERROR, {"code": exc.code, "message": str(exc), **exc.extra}
                    )
        except (OSError, protocol.ProtocolError):
            pass  # the peer went away or stalled: its pins go below
        except Exception:
            log.exception("unexpected error on a connection (closed)")
        finally:
            for key, entry in pins:
                self.store.unpin_value(key, entry)
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _dispatch(
        self, conn: socket.socket, msg: protocol.Message, pins: list[tuple[Hashable, Entry]]
    ) -> None:
        f = msg.fields
        if msg.kind == protocol.HELLO:
            protocol.send(
                conn,
                protocol.OK,
                {"version": protocol.VERSION, "roots": self.roots, "pid": os.getpid()},
            )
        elif msg.kind == protocol.GET:
            entry, key = self._acquire(f["root"], f["name"], f["identity"])
            try:
                self._wait_ready(conn, entry)
            except BaseException:
                self.store.unpin_value(key, entry)  # a failed GET holds nothing
                raise
            # the pin is this entry's, not the key's: a RELEASE after the entry was dropped and
            # another filled under the same key never unpins the other one
            pins.append((key, entry))
            fds = list(entry.memfds)
            for i in range(0, len(fds), protocol.MAX_FDS_PER_FRAME):
                part = fds[i : i + protocol.MAX_FDS_PER_FRAME]
                protocol.send(conn, protocol.FDS, {"first": i, "count": len(part)}, part)
            self._count("served_bytes", entry.nbytes)
            protocol.send(
                conn,
                protocol.OK,
                {"identity": entry.identity, "sizes": entry.sizes, "verified": entry.verified},
            )
        elif msg.kind == protocol.RELEASE:
            for key, entry in pins:
                self.store.unpin_value(key, entry)
            pins.clear()
            protocol.send(conn, protocol.OK, {})
        elif msg.kind == protocol.PREFETCH:
            entry, key = self._acquire(f["root"], f["name"], None)
            try:
                self._wait_ready(conn, entry)
            finally:
                self.store.unpin_value(key, entry)
            protocol.send(conn, protocol.OK, {"identity": entry.identity, "nbytes": entry.nbytes})
        elif msg.kind == protocol.EVICT:
            evicted = in_use = 0
            held = self.store.keys()
            for key in held:
                if isinstance(key, tuple) and key[:2] == (f["root"], f["name"]):
                    if self.store.evict(key):
                        evicted += 1
                    else:
                        in_use += 1
            protocol.send(conn, protocol.OK, {"evicted": evicted, "in_use": in_use})
        elif msg.kind == protocol.LIST:
            protocol.send(conn, protocol.OK, self.listing())
        elif msg.kind == protocol.STATS:
            protocol.send(conn, protocol.OK, self.stats())

    # ------------------------------------------------------------------ cache
    def listing(self, limit: int = 200) -> dict[str, Any]:
        entries = []
        keys = self.store.keys()
        for key in keys[-limit:]:
            e = self.store.peek(key)
            if e is None:
                continue
            entries.append(
                {
                    "root": self.roots[e.root],
                    "name": e.name,
                    "identity": e.identity,
                    "nbytes": e.nbytes,
                    "partitions": len(e.sizes),
                    "pins": self.store.pins(key),
                    "ready": e.ready.is_set() and e.error is None,
                }
            )
        return {"entries": entries, "truncated": len(keys) > limit}

    def stats(self) -> dict[str, Any]:
        s = self.store.stats().as_dict()
        # a tiers counter: the daemon drops an entry only when its fill failed (``fill_failures``)
        del s["dropped_modified"]
        s.update(self.counters)
        held = self.store.keys()
        s["memfds"] = sum(len(e.memfds) for k in held if (e := self.store.peek(k)))
        with self._lock:
            s["open_connections"] = len(self._conns)
        return s

    def _acquire(self, root_i: int, name: str, wanted: str | None) -> tuple[Entry, Hashable]:
        """The entry of the checkpoint's current generation, pinned for the caller (single
        flight: a missing entry is created, reserved and filled once)."""
        if root_i >= len(self.roots):
            raise ServeError("bad_name", f"root {root_i} does not exist")
        root = self.roots[root_i]
        try:
            real = names.resolve(root, name)
        except names.NameError_ as exc:
            raise ServeError("bad_name", str(exc)) from None
        # opened as a load opens it (beneath its directory; Hugging Face cache snapshots and
        # single files included); the fill reads through these very descriptors
        try:
            ck, stamped = names.open_consistent(real)
        except names.ChangedError as exc:
            raise ServeError("stale", str(exc)) from None
        except FastckptError as exc:
            raise ServeError("invalid", f"{name}: {exc}") from None
        except OSError as exc:
            raise ServeError("not_found", f"{name}: {exc.strerror or exc}") from None
        try:
            index = ck.index
            for path in stamped:
                if not names.within(os.path.realpath(path), root):
                    raise ServeError(
                        "bad_name", f"{name}: a file of the checkpoint lies outside its root"
                    )
            ident = names.identity(index, stamped)
            if wanted is not None and ident != wanted:
                self._count("stale", 1)
                raise ServeError("stale", f"{name} changed on disk", identity=ident)
            key = (root_i, name, ident)
            with self._lock:
                entry = self.store.get(key, pin=True)
                if entry is not None:
                    ck.close()
                    return entry, key
                entry = Entry(
                    root=root_i,
                    name=name,
                    identity=ident,
                    kind=index.kind,
                    sizes=[p.nbytes for p in index.partitions],
                )
                # reserve the bytes, pinned twice: once for the filler, once for the caller
                if not self.store.put(key, entry, entry.nbytes, pin=True):
                    raise ServeError(
                        "no_room",
                        f"{name} ({entry.nbytes} bytes) does not fit the DRAM budget "
                        f"({self.store.capacity_bytes} bytes) beside the checkpoints in use",
                    )
                self.store.pin(key)
                held = self.store.keys()
                for other in held:
                    if isinstance(other, tuple) and other[:2] == key[:2] and other != key:
                        self.store.evict(other)  # an older generation: never served again
            self._fills.submit(self._fill, key, entry, ck, stamped)
        except BaseException:
            ck.close()
            raise
        return entry, key

    def _wait_ready(self, conn: socket.socket, entry: Entry) -> None:
        while not entry.ready.wait(PROGRESS_EVERY_S):
            if self._stop.is_set():
                raise ServeError("stopping", "the daemon is shutting down")
            protocol.send(conn, protocol.PROGRESS, {"loaded": entry.loaded, "total": entry.nbytes})
        if entry.error is not None:
            raise ServeError("load_failed", entry.error)

    def _fill(
        self,
        key: Hashable,
        entry: Entry,
        ck: OpenCheckpoint,
        stamped: dict[str, names.FileStamp],
    ) -> None:
        self._count("fills", 1)
        index = ck.index
        try:
            for j, part in enumerate(index.partitions):
                entry.memfds.append(
                    self._fill_partition(entry, index, j, ck.partitions[j], stamped[part.path])
                )
            for part, f in zip(index.partitions, ck.partitions, strict=True):
                if names.stamp(os.fstat(f.fd)) != stamped[part.path]:
                    raise ServeError("changed", f"{part.file} was modified while it was read")
            entry.verified = self.cfg.verify and index.checksum_algorithm is not None
            self._count("fill_bytes", entry.nbytes)
        except BaseException as exc:
            self._count("fill_failures", 1)
            entry.error = f"{entry.name}: {exc}"
            log.warning("filling %s failed: %s", entry.name, exc)
            self.store.drop(key)
            entry.close()
        finally:
            ck.close()
            if entry.closed and entry.error is None:
                entry.close()
            entry.ready.set()
            self.store.unpin_value(key, entry)

    def _fill_partition(
        self, entry: Entry, index: Index, j: int, opened: OpenFile, want: names.FileStamp
    ) -> int:
        part = index.partitions[j]
        src = opened.fd
        if names.stamp(os.fstat(src)) != want:
            raise ServeError("changed", f"{part.file} was modified while the index was read")
        fd = os.memfd_create(
            f"fastckpt:{entry.name[-200:]}:{j}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        try:
            size = part.nbytes
            os.ftruncate(fd, size)
            if size:
                self._copy_into(fd, src, size, entry, index, j)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _copy_into(self, fd: int, src: int, size: int, entry: Entry, index: Index, j: int) -> None:
        """Read the partition into the memfd with a few threads (``preadv`` releases the GIL),
        then check its chunk checksums, also in parallel."""
        part = index.partitions[j]
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with contextlib.suppress(AttributeError, OSError):
            # huge shmem pages where the kernel allows them on request (shmem_enabled=advise):
            # clients' mappings then fault far fewer pages
            mm.madvise(mmap.MADV_HUGEPAGE)
        try:
            with memoryview(mm) as mv:

                def read(start: int) -> None:
                    end = min(size, start + FILL_CHUNK)
                    off = start
                    while off < end:
                        if self._stop.is_set() or entry.closed:
                            raise ServeError("stopping", "fill abandoned")
                        n = os.preadv(src, [mv[off:end]], off)
                        if n <= 0:
                            raise ServeError(
                                "changed", f"{part.file} ended at byte {off}, the index says {size}"
                            )
                        off += n
                        entry.loaded += n

                list(self._readers.map(read, range(0, size, FILL_CHUNK)))
                chunk = index.checksum_chunk_bytes
                if self.cfg.verify and part.checksums is not None and chunk:
                    sums = part.checksums
                    list(
                        self._readers.map(
                            lambda k: _verify_chunk(mv, k, sums[k], chunk, part.file),
                            range(len(sums)),
                        )
                    )
        finally:
            mm.close()


def _verify_chunk(mv: memoryview, k: int, expected: int, chunk: int, file: str) -> None:
    from fastckpt.io_engine import crc32c

    actual = crc32c(mv[k * chunk : (k + 1) * chunk])
    if actual != expected:
        raise ServeError(
            "checksum",
            f"{file}: chunk {k} has CRC32C {actual:#010x}, the index says {expected:#010x}",
        )
