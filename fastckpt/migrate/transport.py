"""Request/reply messages between the two sides of a migration, behind a small interface.

``Transport`` is all the driver side needs: ``request(header, payload) -> (header, payload)``
where a header is a JSON-able dict and a payload opaque bytes (a serialised ``TokenState``). An
engine that already has a channel (gRPC, Ray actors, its own RPC) implements these two methods.

``SocketTransport`` / ``serve_socket`` are the one built-in implementation: TCP, one frame per
message::

    u32 header length | u32 payload length | header (UTF-8 JSON object) | payload

(little-endian). Headers are limited to ``MAX_HEADER_BYTES`` and payloads to
``MAX_PAYLOAD_BYTES``; a frame beyond them, a truncated frame or a header that is not a JSON
object raises ``TransportError`` and the connection is dropped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from fastckpt.migrate.errors import TransportError

FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 64 << 20

Message = tuple[dict[str, Any], bytes]
Handler = Callable[[dict[str, Any], bytes], Message]


class Transport(Protocol):
    def request(self, header: dict[str, Any], payload: bytes = b"") -> Message: ...

    def close(self) -> None: ...


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise TransportError(f"message header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TransportError(f"message payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return FRAME.pack(len(raw), len(payload)) + raw + bytes(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise TransportError(f"timed out after receiving {len(buf)} of {n} bytes") from None
        except OSError as e:
            raise TransportError(f"connection failed: {e}") from e
        if not chunk:
            raise TransportError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Message:
    header_len, payload_len = FRAME.unpack(_recv_exact(sock, FRAME.size))
    if header_len > MAX_HEADER_BYTES:
        raise TransportError(f"frame header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise TransportError(f"frame payload length {payload_len} exceeds {MAX_PAYLOAD_BYTES}")
    raw = _recv_exact(sock, header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TransportError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise TransportError("frame header must be a JSON object")
    return header, _recv_exact(sock, payload_len)


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    data = encode_frame(header, payload)
    try:
        sock.sendall(data)
    except OSError as e:
        raise TransportError(f"send failed: {e}") from e


class SocketTransport:
    """Client end of a TCP connection to a ``serve_socket`` server; one request at a time."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 60.0) -> None:
        self.address = (host, port)
        self.timeout_s = timeout_s
        try:
            self._sock: socket.socket | None = socket.create_connection(
                self.address, timeout=timeout_s
            )
        except OSError as e:
            raise TransportError(f"cannot connect to {host}:{port}: {e}") from e
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()

    def request(self, header: dict[str, Any], payload: bytes = b"") -> Message:
        with self._lock:
            if self._sock is None:
                raise TransportError(f"transport to {self.address[0]}:{self.address[1]} is closed")
            try:
                send_frame(self._sock, header, payload)
                return recv_frame(self._sock)
            except TransportError:
                self._drop()
                raise

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> SocketTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketServer:
    """Serves ``handler(header, payload) -> (header, payload)`` on TCP, a thread per connection.

    ``port=0`` picks a free port (read it from ``.port``). ``serve_forever()`` blocks until
    ``shutdown()``; ``start()`` runs it on a daemon thread.
    """

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._listener = socket.create_server((host, port))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> SocketServer:
        self._accept_thread = threading.Thread(
            target=self.serve_forever, name="migrate-server", daemon=True
        )
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    header, payload = recv_frame(conn)
                except TransportError:
                    return  # peer gone or malformed frame: drop the connection
                reply, out = self._handler(header, payload)
                try:
                    send_frame(conn, reply, out)
                except TransportError:
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
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
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def serve_socket(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> SocketServer:
    """Start a ``SocketServer`` on a background thread and return it."""
    return SocketServer(handler, host, port).start()


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Message",
    "SocketServer",
    "SocketTransport",
    "Transport",
    "encode_frame",
    "recv_frame",
    "send_frame",
    "serve_socket",
]
