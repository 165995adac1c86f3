"""Client of the ``fastckpt serve`` cache daemon.

``load_via_server(path, device)`` is what ``fastckpt.load`` calls first when a daemon is
configured (argument or ``FASTCKPT_SERVER``). It returns the tensors, or None when the daemon
cannot serve this load, and the caller then reads the files itself:

- no daemon configured: None at once (no socket is touched);
- the checkpoint is not under one of the daemon's roots, does not fit its budget, changed on disk
  between the client's and the daemon's look at it, or ``verify`` was asked of a daemon that did
  not verify: None, silently (a normal outcome);
- the daemon is unreachable, stalls, dies mid-load or answers nonsense: None, and one warning per
  process (``ServerUnavailableWarning``). Every socket wait is bounded by ``server_timeout_s``; a
  fill that makes no progress for that long counts as a stall, and one answer may take at most
  ``server_fill_wait_s`` however its fill progresses;
- the socket is served by a process of another user (not root, not ``server_uid``), or, with
  ``verify=True``, the bytes received do not match the chunk checksums of the index this client
  read itself: None, and a warning each time.

A CPU load maps each received memfd privately: tensors are copy-on-write views of the daemon's
sealed memory (no copy; writing to a tensor copies that page, never the cache). A GPU load maps
the same way and copies each buffer's segments to the device with ``Tensor.copy_`` from the
mapping (pageable memory, not the pinned staging ring: a first version).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import stat
import time
import warnings
from collections.abc import Iterable
from typing import Any

from fastckpt.config import get_config
from fastckpt.rules import peers
from fastckpt.serve import names, protocol

_warned = False


class ServerUnavailableWarning(RuntimeWarning):
    """The configured cache daemon could not serve a load; the files were read directly."""


class ServerRefused(Exception):
    """The daemon answered a request with an error (``code``: denied, bad_name, no_room, ...)."""

    def __init__(self, code: str, message: str, fields: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.fields = fields


class ServedBytesError(protocol.ProtocolError):
    """Bytes the daemon handed out do not match the checkpoint's chunk checksums."""


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"fastckpt: the cache daemon could not serve a load ({reason}); loading from the "
            "files directly (warned once per process)",
            ServerUnavailableWarning,
            stacklevel=4,
        )


def _warn_untrusted(reason: str) -> None:
    """A daemon that is not who it should be, or that sent wrong bytes: said every time (the
    warnings filter still shows one message once per place), never folded into the once-only
    'unavailable' warning."""
    warnings.warn(
        f"fastckpt: the cache daemon was not used ({reason}); loading from the files directly",
        ServerUnavailableWarning,
        stacklevel=4,
    )


class Client:
    """One connection to the daemon, after checking who runs it.

    The daemon's credentials (``SO_PEERCRED``) are checked before anything is sent or read: it
    must run as this user, as root, or as ``trust_uid`` (default: config ``server_uid``);
    otherwise ``UntrustedPeerError`` (a ``PermissionError``). Every wait is bounded: each frame
    by ``timeout_s``, a fill that stops progressing by ``timeout_s``, and one whole request,
    however its fill progresses, by ``fill_wait_s`` (default: config ``server_fill_wait_s``).
    """

    def __init__(
        self,
        socket_path: str,
        timeout_s: float = 10.0,
        *,
        trust_uid: int | None = None,
        fill_wait_s: float | None = None,
    ) -> None:
        cfg = get_config()
        self.timeout_s = timeout_s
        self.fill_wait_s = cfg.server_fill_wait_s if fill_wait_s is None else fill_wait_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(socket_path)
            self.peer = peers.trusted_server(
                self.sock,
                f"the cache daemon at {socket_path!r}",
                cfg.server_uid if trust_uid is None else trust_uid,
                knob="FASTCKPT_SERVER_UID",
            )
        except BaseException:
            self.sock.close()
            raise
        self.reader = protocol.Reader(self.sock, accept_fds=True)
        self._roots: list[str] | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, kind: int, fields: dict[str, Any] | None = None, *, total: int | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        """Send a request; return the OK reply's fields and the descriptors that came before it.

        Raises ServerRefused on an ERROR reply, TimeoutError when a frame takes longer than
        ``timeout_s``, a fill stops progressing for that long, or the whole answer takes longer
        than ``fill_wait_s``, and ProtocolError on nonsense: progress whose ``total`` is not
        ``total`` (when given) or changes, whose ``loaded`` goes back or passes ``total``."""
        protocol.send(self.sock, kind, fields)
        fds: list[int] = []
        last_loaded = -1
        seen_total = total
        started = time.monotonic()
        last_progress = started
        deadline = started + self.fill_wait_s
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(
                        f"the cache daemon did not answer within server_fill_wait_s = "
                        f"{self.fill_wait_s:g} s"
                    )
                msg = self.reader.read(deadline=min(deadline, now + self.timeout_s))
                if msg.kind == protocol.PROGRESS:
                    protocol.close_fds(msg.fds)
                    loaded, got_total = msg.fields.get("loaded"), msg.fields.get("total")
                    if type(loaded) is not int or type(got_total) is not int:
                        raise protocol.ProtocolError("progress without byte counts")
                    if seen_total is None:
                        seen_total = got_total
                    if got_total != seen_total or not max(last_loaded, 0) <= loaded <= got_total:
                        raise protocol.ProtocolError(
                            f"nonsense progress: {loaded} of {got_total} bytes after "
                            f"{max(last_loaded, 0)} of {seen_total}"
                        )
                    now = time.monotonic()
                    if loaded > last_loaded:
                        last_loaded, last_progress = loaded, now
                    elif now - last_progress > self.timeout_s:
                        raise TimeoutError("the cache daemon's fill made no progress")
                elif msg.kind == protocol.FDS:
                    if msg.fields.get("first") != len(fds) or msg.fields.get("count") != len(
                        msg.fds
                    ):
                        protocol.close_fds(msg.fds)
                        raise protocol.ProtocolError("descriptor frame out of order")
                    fds.extend(msg.fds)
                elif msg.kind == protocol.OK:
                    if msg.fds:
                        protocol.close_fds(msg.fds)
                        raise protocol.ProtocolError("descriptors on a reply frame")
                    return msg.fields, fds
                elif msg.kind == protocol.ERROR:
                    protocol.close_fds(msg.fds)
                    raise ServerRefused(
                        str(msg.fields.get("code")), str(msg.fields.get("message")), msg.fields
                    )
                else:
                    protocol.close_fds(msg.fds)
                    raise protocol.ProtocolError(f"unexpected reply kind {msg.kind}")
        except BaseException:
            protocol.close_fds(fds)
            raise

    def roots(self) -> list[str]:
        if self._roots is None:
            reply, _ = self.request(protocol.HELLO)
            roots = reply.get("roots")
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise protocol.ProtocolError("hello reply without a list of roots")
            self._roots = roots
        return self._roots

    def locate(self, path: str | os.PathLike[str]) -> tuple[int, str]:
        where = names.split(self.roots(), path)
        if where is None:
            raise ServerRefused(
                "bad_name", f"{os.fspath(path)!r} is not under the daemon's roots", {}
            )
        return where

    def get(
        self, path: str | os.PathLike[str], identity: str, *, total: int | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        root, name = self.locate(path)
        return self.request(
            protocol.GET, {"root": root, "name": name, "identity": identity}, total=total
        )

    def prefetch(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        root, name = self.locate(path)
        return self.request(protocol.PREFETCH, {"root": root, "name": name})[0]

    def evict(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        root, name = self.locate(path)
        return self.request(protocol.EVICT, {"root": root, "name": name})[0]

    def evict_name(self, root: int, name: str) -> dict[str, Any]:
        return self.request(protocol.EVICT, {"root": root, "name": name})[0]

    def release(self) -> dict[str, Any]:
        return self.request(protocol.RELEASE)[0]

    def ls(self) -> dict[str, Any]:
        return self.request(protocol.LIST)[0]

    def stats(self) -> dict[str, Any]:
        return self.request(protocol.STATS)[0]


def _check_memfd(fd: int, size: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise protocol.ProtocolError("the daemon sent a descriptor that is not a memfd")
    if st.st_size != size:
        raise protocol.ProtocolError(f"memfd holds {st.st_size} bytes, the reply says {size}")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    need = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if seals & need != need:
        raise protocol.ProtocolError("the daemon sent a memfd that is not sealed")


def _verify_served(index: Any, plan: Any, fds: list[int]) -> None:
    """Check every chunk of the partitions ``plan`` reads, as received, against the chunk
    checksums of the index this client read itself (``verify=True``: the daemon's word that it
    verified is not enough). Raises ``ServedBytesError`` naming the first bad chunk."""
    from fastckpt.io_engine import crc32c

    chunk = index.checksum_chunk_bytes
    for j in sorted({b.partition for b in plan.buffers if b.nbytes}):
        part = index.partitions[j]
        if part.checksums is None or not chunk or not part.nbytes:
            continue
        with (
            mmap.mmap(fds[j], part.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm,
            memoryview(mm) as mv,
        ):
            for k, expected in enumerate(part.checksums):
                actual = crc32c(mv[k * chunk : (k + 1) * chunk])
                if actual != expected:
                    raise ServedBytesError(
                        f"{part.file}: chunk {k} as served has CRC32C {actual:#010x}, the "
                        f"index says {expected:#010x} (checksum mismatch)"
                    )


def load_via_server(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    names_: Iterable[str] | None = None,
    verify: bool = False,
    stats: bool = False,
    server: str | None = None,
    timeout_s: float | None = None,
    fill_wait_s: float | None = None,
    trust_uid: int | None = None,
) -> Any:
    """Load through the cache daemon: ``{name: tensor}`` (with a ``LoadStats`` when ``stats``),
    or None when the caller should read the files itself (see the module docstring).
    ``fill_wait_s`` / ``trust_uid``: ``Client``'s (default: config ``server_fill_wait_s`` /
    ``server_uid``)."""
    cfg = get_config()
    socket_path = server if server is not None else cfg.server
    if not socket_path:
        return None
    timeout = timeout_s if timeout_s is not None else cfg.server_timeout_s
    t_start = time.perf_counter()
    from fastckpt.errors import FastckptError
    from fastckpt.loader.plan import plan_load

    try:
        real = os.path.realpath(os.fspath(path))
        index, stamped = names.read_consistent(real)
        ident = names.identity(index, stamped)
        if verify and index.checksum_algorithm is None:
            return None
        target = dict(device) if isinstance(device, dict) else device
        plan = plan_load(index, target, names=names_, chunk_bytes=cfg.ring_slot_bytes)
    except (FastckptError, KeyError, OSError, ValueError):
        return None  # the direct load reports it, with the very same error
    if any(d != "cpu" for d in plan.devices):
        import torch

        if not torch.cuda.is_available():
            return None
    t_plan = time.perf_counter()
    fds: list[int] = []
    try:
        with Client(socket_path, timeout, fill_wait_s=fill_wait_s, trust_uid=trust_uid) as client:
            try:
                reply, fds = client.get(real, ident, total=sum(p.nbytes for p in index.partitions))
            except ServerRefused as exc:
                if exc.code == "denied":
                    _warn_once("the daemon refused this user")
                return None
            sizes = reply.get("sizes")
            if (
                not isinstance(sizes, list)
                or sizes != [p.nbytes for p in index.partitions]
                or len(fds) != len(sizes)
                or reply.get("identity") != ident
            ):
                raise protocol.ProtocolError("the reply does not match the checkpoint")
            if verify and reply.get("verified") is not True:
                return None
            for fd, size in zip(fds, sizes, strict=True):
                _check_memfd(fd, size)
            if verify:
                _verify_served(index, plan, fds)
            tensors, path_taken = _build(index, plan, fds)
    except (peers.UntrustedPeerError, ServedBytesError) as exc:
        _warn_untrusted(str(exc))
        return None
    except (OSError, protocol.ProtocolError) as exc:  # TimeoutError is an OSError
        _warn_once(f"{type(exc).__name__}: {exc}")
        return None
    finally:
        protocol.close_fds(fds)
    if not stats:
        return tensors
    from fastckpt.loader.stats import LoadStats, record

    t_end = time.perf_counter()
    result = LoadStats(
        path=index.root,
        kind=index.kind,
        devices=plan.devices,
        nbytes=plan.tensor_nbytes,
        read_nbytes=0,
        tensors=len(tensors),
        buffers=len(plan.buffers),
        seconds=t_end - t_start,
        plan_s=t_plan - t_start,
        alloc_s=0.0,
        read_wait_s=0.0,
        copy_wait_s=0.0,
        verify_s=0.0,
        ring_s=0.0,
        finalize_s=0.0,
        engine="server",
        path_taken=path_taken,
        verified_chunks=0,
        notes=(f"served by the cache daemon at {socket_path}",),
    )
    record(result)
    return tensors, result


def _build(index: Any, plan: Any, fds: list[int]) -> tuple[dict[str, Any], str]:
    """Tensors of ``plan`` from the partitions' memfds: private mappings (CPU) or copies from
    them (GPU). View offsets come from the plan (GPU buffers) or, for a mapping, from the file
    offset of each tensor, as the executor's mapped path does."""
    import torch

    from fastckpt.format import dtypes

    buffers: dict[int, tuple[Any, int | None]] = {}
    paths: set[str] = set()
    for b in plan.buffers:
        if b.nbytes == 0:
            continue
        start = b.segments[0][0]
        end = b.segments[-1][1]
        mm = mmap.mmap(
            fds[b.partition],
            end - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        host = torch.frombuffer(mm, dtype=torch.uint8)
        if b.device == "cpu":
            buffers[b.index] = (host, start)
            paths.add("server-map")
        else:
            dev = torch.empty(b.nbytes, dtype=torch.uint8, device=b.device)
            for s, t, d in b.segments:
                dev[d : d + (t - s)].copy_(host[s - start : t - start])
            buffers[b.index] = (dev, None)
            paths.add("server-copy")
    out: dict[str, Any] = {}
    for v in plan.views:
        dt = dtypes.torch_dtype(v.dtype, tensor=v.name)
        if v.nbytes == 0:
            dev_name = next(b.device for b in plan.buffers if b.index == v.buffer)
            out[v.name] = torch.empty(v.shape, dtype=dt, device=dev_name)
            continue
        buf, start = buffers[v.buffer]
        rel = v.rel_offset if start is None else index.tensors[v.name].offset - start
        raw = buf[rel : rel + v.nbytes]
        if rel % dtypes.get(v.dtype).itemsize:
            own = torch.empty(v.shape, dtype=dt, device=buf.device)
            own.reshape(-1).view(torch.uint8).copy_(raw)
            out[v.name] = own
        else:
            out[v.name] = raw.view(dt).view(v.shape)
    for alias, target in plan.aliases.items():
        out[alias] = out[target]
    return out, "+".join(sorted(paths)) or "none"
