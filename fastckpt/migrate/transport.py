"""Request/reply messages between the two sides of a migration, behind a small interface.

``Transport`` is all the driver side needs: ``request(header, payload) -> (header, payload)``
where a header is a JSON-able dict and a payload opaque bytes (a serialised ``TokenState``). An
engine that already has a channel (gRPC, Ray actors, its own RPC) implements these two methods.

``SocketTransport`` / ``SocketServer`` are the built-in implementation, over TCP or a Unix
socket, one frame per message::

    u32 header length | u32 payload length | header (UTF-8 JSON object) | payload [| tag]

(little-endian). Headers are limited to ``MAX_HEADER_BYTES`` and payloads to
``MAX_PAYLOAD_BYTES``; a frame beyond them, a truncated frame or a header that is not a JSON
object raises ``TransportError`` and the connection is dropped.

**Who may talk to a server.** On accepting a connection the server sends a greeting frame
(``{"fastckpt_migrate": 1, "auth": "hmac-sha256" | "none", "nonce": <hex>}``).

- *Shared secret* (``secret=`` or the file named by ``FASTCKPT_MIGRATE_SECRET_FILE``, which both
  ends read by default): the client answers the greeting with ``{"op": "auth", "nonce": <hex>}``
  and the server confirms; from then on every frame, both ways, ends with a 32-byte HMAC-SHA256
  tag over a direction label, both nonces, the frame's sequence number in its direction and the
  frame itself. A frame that was forged, altered, replayed, reordered or moved to another
  connection fails its tag and the connection is dropped before the handler sees it. A client
  that has a secret refuses a server that does not ask for one (and the reverse).
- *Unix socket* (``SocketServer(..., unix=PATH)``, ``SocketTransport.unix(PATH)``): the server
  checks every peer's credentials (``SO_PEERCRED``: its own uid, root, or ``allow_uids``) before
  the greeting, the client checks the server's, and the socket lives in a directory only its
  owner can write. This costs nothing and is what same-host moves should use.
- *TCP without a secret* is accepted only on a loopback address (any local process can then
  connect); a server on another address needs a secret or an explicit ``insecure=True``.

**What a server bounds.** At most ``max_connections`` connections (more are closed at accept),
one thread each, reaped when it ends; a connection must deliver each whole request within
``idle_timeout_s`` (a silent or trickling peer is dropped); running out of descriptors
(``EMFILE``) pauses accepting briefly instead of stopping it. ``SocketTransport`` reconnects
(with a new handshake) when the server dropped its idle connection between requests.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import secrets
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastckpt.migrate.errors import TransportError
from fastckpt.migrate.frames import (
    CONFIGURED,
    FRAME,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    NONCE_BYTES,
    PROTOCOL,
    TAG_BYTES,
    Message,
    Session,
    _Default,
    _hex_nonce,
    _recv_exact,
    _secret,
    configured_secret,
    encode_frame,
    recv_frame,
    send_frame,
)
from fastckpt.rules import peers

log = logging.getLogger("fastckpt.migrate")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 60.0
_ACCEPT_PAUSE_S = 0.1

Handler = Callable[[dict[str, Any], bytes], Message]


class Transport(Protocol):
    def request(self, header: dict[str, Any], payload: bytes = b"") -> Message: ...

    def close(self) -> None: ...


class SocketTransport:
    """Client end of a connection to a ``SocketServer``; one request at a time.

    ``secret``: the shared secret (default: ``FASTCKPT_MIGRATE_SECRET_FILE``'s, if configured;
    None: none). ``trust_uid``: for a Unix socket, a uid trusted besides this user and root.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 60.0,
        secret: bytes | str | _Default | None = CONFIGURED,
        _unix: str | None = None,
        trust_uid: int | None = None,
    ) -> None:
        self.address: tuple[str, int] | str = _unix if _unix is not None else (host, port)
        self.timeout_s = timeout_s
        self._secret = _secret(secret)
        self._trust_uid = trust_uid
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._closed = False
        self._connect()

    @classmethod
    def unix(
        cls,
        path: str,
        *,
        timeout_s: float = 60.0,
        secret: bytes | str | _Default | None = CONFIGURED,
        trust_uid: int | None = None,
    ) -> SocketTransport:
        """A transport over the Unix socket at ``path`` (the server's uid is checked)."""
        return cls("", 0, timeout_s=timeout_s, secret=secret, _unix=path, trust_uid=trust_uid)

    def _where(self) -> str:
        if isinstance(self.address, str):
            return self.address
        return f"{self.address[0]}:{self.address[1]}"

    def _connect(self) -> None:
        try:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout_s)
                    sock.connect(self.address)
                    peers.trusted_server(
                        sock,
                        f"the migration server at {self.address!r}",
                        0 if self._trust_uid is None else self._trust_uid,
                    )
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.address, timeout=self.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise TransportError(f"cannot connect to {self._where()}: {e}") from e
        try:
            self._session = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _handshake(self, sock: socket.socket) -> Session | None:
        deadline = time.monotonic() + self.timeout_s
        greeting, _ = recv_frame(sock, deadline=deadline)
        if greeting.get("fastckpt_migrate") != PROTOCOL:
            raise TransportError(f"{self._where()} is not a fastckpt migration server")
        auth = greeting.get("auth")
        if auth == "none":
            if self._secret is not None:
                raise TransportError(
                    f"{self._where()} does not authenticate, but this side has a shared secret; "
                    "refusing to talk to it (give the server the same secret)"
                )
            return None
        if auth != "hmac-sha256":
            raise TransportError(f"{self._where()} asks for unknown authentication {auth!r}")
        if self._secret is None:
            raise TransportError(
                f"{self._where()} requires a shared secret; set FASTCKPT_MIGRATE_SECRET_FILE or "
                "pass secret="
            )
        server_nonce = _hex_nonce(greeting.get("nonce"))
        mine = secrets.token_bytes(NONCE_BYTES)
        session = Session(self._secret, server_nonce, mine, server=False)
        send_frame(sock, {"op": "auth", "nonce": mine.hex()}, session=session)
        try:
            reply, _ = recv_frame(sock, session=session, deadline=deadline)
        except TransportError as e:
            raise TransportError(
                f"{self._where()} did not accept this side's shared secret ({e})"
            ) from e
        if reply.get("ok") is not True:
            raise TransportError(f"{self._where()} refused the handshake: {reply}")
        return session

    def _stale(self) -> bool:
        """Whether the server closed this idle connection (readable, and at end of stream)."""
        assert self._sock is not None
        try:
            ready, _, _ = select.select([self._sock], [], [], 0)
            if not ready:
                return False
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def request(self, header: dict[str, Any], payload: bytes = b"") -> Message:
        with self._lock:
            if self._closed:
                raise TransportError(f"transport to {self._where()} is closed")
            if self._sock is None or self._stale():
                self._drop()
                self._connect()  # the server dropped the idle connection: a fresh handshake
            assert self._sock is not None
            try:
                self._sock.settimeout(self.timeout_s)
                send_frame(self._sock, header, payload, session=self._session)
                return recv_frame(
                    self._sock,
                    session=self._session,
                    deadline=time.monotonic() + self.timeout_s,
                )
            except TransportError:
                self._drop()
                self._closed = True
                raise

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._session = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> SocketTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SocketServer:
    """Serves ``handler(header, payload) -> (header, payload)``, a thread per connection.

    TCP on ``host:port`` (``port=0`` picks a free port: read ``.port``), or a Unix socket at
    ``unix``. ``secret``: shared secret every frame must be signed with (default: the
    configured ``FASTCKPT_MIGRATE_SECRET_FILE``, if any; None: none). ``allow_uids``: for a Unix
    socket, users allowed besides this one and root. ``insecure``: allow TCP without a secret
    on a non-loopback address. ``serve_forever()`` blocks until ``shutdown()``; ``start()`` runs
    it on a daemon thread.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        unix: str | None = None,
        secret: bytes | str | _Default | None = CONFIGURED,
        allow_uids: frozenset[int] | set[int] = frozenset(),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        insecure: bool = False,
    ) -> None:
        if max_connections < 1 or idle_timeout_s <= 0:
            raise ValueError("max_connections must be >= 1 and idle_timeout_s > 0")
        self._handler = handler
        self._secret = _secret(secret)
        self._allow_uids = frozenset(allow_uids)
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.unix = unix
        if unix is not None:
            self._listener = _bind_unix(unix)
            if self._allow_uids:
                os.chmod(unix, 0o666)  # SO_PEERCRED decides; the directory's mode still applies
            self.host, self.port = unix, 0
        else:
            if self._secret is None and not insecure and not _is_loopback(host):
                raise TransportError(
                    f"refusing to serve migrations unauthenticated on {host}: set "
                    "FASTCKPT_MIGRATE_SECRET_FILE (or pass secret=), use a Unix socket for "
                    "same-host moves, or pass insecure=True"
                )
            self._listener = socket.create_server((host, port))
            self.host = host
            self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(
            ("accepted", "refused_full", "refused_peers", "auth_failures", "dropped", "emfile"),
            0,
        )

    def start(self) -> SocketServer:
        self._accept_thread = threading.Thread(
            target=self.serve_forever, name="migrate-server", daemon=True
        )
        self._accept_thread.start()
        return self

    def stats(self) -> dict[str, int]:
        """Counters, open connections and live connection threads."""
        with self._lock:
            return {
                **self.counters,
                "open_connections": len(self._conns),
                "threads": len(self._threads),
            }

    def serve_forever(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopped.is_set():
                    break
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    with self._lock:
                        self.counters["emfile"] += 1
                    log.warning("accept failed (%s); pausing %.1f s", e, _ACCEPT_PAUSE_S)
                    time.sleep(_ACCEPT_PAUSE_S)  # descriptors free up as connections end
                    continue
                if e.errno in (errno.EBADF, errno.EINVAL):
                    break  # the listener was closed
                log.warning("accept failed: %s", e)
                time.sleep(_ACCEPT_PAUSE_S)
                continue
            self._start_connection(conn)

    def _start_connection(self, conn: socket.socket) -> None:
        with self._lock:
            if len(self._conns) >= self.max_connections:
                self.counters["refused_full"] += 1
                conn.close()
                return
            self.counters["accepted"] += 1
            self._conns.add(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            self._threads.add(t)
        try:
            t.start()
        except RuntimeError:  # no thread could be made: the connection goes
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(t)
            conn.close()

    def _greet(self, conn: socket.socket) -> Session | None:
        deadline = time.monotonic() + self.idle_timeout_s
        if self.unix is not None:
            peer = peers.peer_credentials(conn)
            if peer.uid not in (os.getuid(), 0) and peer.uid not in self._allow_uids:
                with self._lock:
                    self.counters["refused_peers"] += 1
                log.warning("refused migration peer pid %d uid %d", peer.pid, peer.uid)
                raise TransportError("peer not allowed")
        nonce = secrets.token_bytes(NONCE_BYTES)
        auth = "none" if self._secret is None else "hmac-sha256"
        send_frame(conn, {"fastckpt_migrate": PROTOCOL, "auth": auth, "nonce": nonce.hex()})
        if self._secret is None:
            return None
        # the first frame is the client's nonce, signed: it cannot be checked before it is read,
        # so it is read with a provisional session and checked against the nonce it carries
        head = _recv_exact(conn, FRAME.size, deadline)
        header_len, payload_len = FRAME.unpack(head)
        if header_len > 256 or payload_len:
            raise TransportError("handshake frame of the wrong size")
        raw = _recv_exact(conn, header_len, deadline)
        tag = _recv_exact(conn, TAG_BYTES, deadline)
        try:
            hello = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise TransportError(f"handshake is not JSON: {e}") from None
        if not isinstance(hello, dict) or hello.get("op") != "auth":
            raise TransportError("expected the authentication handshake")
        session = Session(self._secret, nonce, _hex_nonce(hello.get("nonce")), server=True)
        try:
            session.check(head + raw, tag)
        except TransportError:
            with self._lock:
                self.counters["auth_failures"] += 1
            raise
        send_frame(conn, {"ok": True}, session=session)
        return session

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = self._greet(conn)
            while not self._stopped.is_set():
                # one deadline per request: a silent or trickling peer is dropped alike
                header, payload = recv_frame(
                    conn, session=session, deadline=time.monotonic() + self.idle_timeout_s
                )
                reply, out = self._handler(header, payload)
                send_frame(conn, reply, out, session=session)
        except (TransportError, OSError):
            with self._lock:
                self.counters["dropped"] += 1
        except Exception:
            log.exception("unexpected error on a migration connection (closed)")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def shutdown(self) -> None:
        """Stop accepting (the port is closed when this returns) and drop open connections."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        if (
            self._accept_thread is not None
            and self._accept_thread is not threading.current_thread()
        ):
            self._accept_thread.join()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self.unix is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def _bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, in a directory only this user (or root) can write;
    a socket left there by a dead server is replaced, a live one refused."""
    try:
        peers.check_private_dir(os.path.dirname(os.path.abspath(path)), create=True)
    except peers.UnsafeLocationError as e:
        raise TransportError(f"socket {path!r}: {e}") from None
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(f"{path!r} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a server that died
        else:
            raise TransportError(f"another server is listening on {path!r}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def serve_socket(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> SocketServer:
    """Start a ``SocketServer`` on a background thread and return it."""
    return SocketServer(handler, host, port).start()


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Message",
    "Session",
    "SocketServer",
    "SocketTransport",
    "Transport",
    "configured_secret",
    "encode_frame",
    "recv_frame",
    "send_frame",
    "serve_socket",
]
