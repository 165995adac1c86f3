"""Wire protocol of the cache daemon: framed, versioned, size-limited, strictly validated.

A frame is a 12-byte header (magic ``FCKS``, protocol version u16, message kind u16, payload
length u32, little-endian) and a payload: a UTF-8 JSON object. A request payload is a flat object
whose keys and value types are fixed per kind (``REQUEST_FIELDS``); anything else (an unknown
kind or version, a missing or extra key, a wrong type, a string too long, a payload over
``MAX_PAYLOAD``, duplicate keys, NaN, file descriptors sent to the daemon) raises
``ProtocolError``, and the daemon closes that one connection.

File descriptors (the memfds holding a checkpoint's partitions) travel with ``FDS`` frames as
``SCM_RIGHTS`` ancillary data, at most ``MAX_FDS_PER_FRAME`` per frame.

Pure Python: no torch, no C++ core.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"FCKS"
VERSION = 1
HEADER = struct.Struct("<4sHHI")
MAX_PAYLOAD = 64 * 1024
MAX_STRING = 4096
MAX_FDS_PER_FRAME = 200

# requests (client -> daemon)
HELLO = 1
GET = 2
RELEASE = 3
LIST = 4
PREFETCH = 5
EVICT = 6
STATS = 7
# replies (daemon -> client)
OK = 100
ERROR = 101
PROGRESS = 102
FDS = 103

REQUEST_FIELDS: dict[int, dict[str, type]] = {
    HELLO: {},
    GET: {"root": int, "name": str, "identity": str},
    RELEASE: {},
    LIST: {},
    PREFETCH: {"root": int, "name": str},
    EVICT: {"root": int, "name": str},
    STATS: {},
}
REPLY_KINDS = frozenset({OK, ERROR, PROGRESS, FDS})
KIND_NAMES = {
    HELLO: "hello",
    GET: "get",
    RELEASE: "release",
    LIST: "list",
    PREFETCH: "prefetch",
    EVICT: "evict",
    STATS: "stats",
    OK: "ok",
    ERROR: "error",
    PROGRESS: "progress",
    FDS: "fds",
}
_MAX_INT = 1 << 62


class ProtocolError(Exception):
    """A frame is malformed, of an unsupported version, or violates the schema."""


class PeerClosed(ProtocolError):
    """The other side closed the connection (at a frame boundary or inside one)."""


@dataclass
class Message:
    kind: int
    fields: dict[str, Any]
    fds: list[int] = field(default_factory=list)


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"duplicate key {k!r}")
        out[k] = v
    return out


def decode_header(head: bytes) -> tuple[int, int]:
    """(kind, payload length) of a 12-byte header, validated."""
    if len(head) != HEADER.size:
        raise ProtocolError(f"header is {len(head)} bytes, expected {HEADER.size}")
    magic, version, kind, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {VERSION})"
        )
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {length} bytes exceeds the limit of {MAX_PAYLOAD}")
    return kind, length


def decode_payload(payload: bytes) -> dict[str, Any]:
    """The JSON object of a payload (any JSON types; schema checks come after)."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD}")
    try:
        text = payload.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("payload must be a JSON object")
    return value


def validate_request(kind: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Check a request's fields against its schema; returns them unchanged."""
    schema = REQUEST_FIELDS.get(kind)
    if schema is None:
        raise ProtocolError(f"message kind {KIND_NAMES.get(kind, kind)} is not a request")
    if set(fields) != set(schema):
        missing = sorted(set(schema) - set(fields))
        extra = sorted(set(fields) - set(schema))
        raise ProtocolError(
            f"{KIND_NAMES[kind]} request: missing keys {missing}, unexpected keys {extra}"
        )
    for key, typ in schema.items():
        value = fields[key]
        if typ is int:
            if type(value) is not int or not 0 <= value < _MAX_INT:
                raise ProtocolError(f"{key!r} must be a non-negative integer")
        elif typ is str and (
            type(value) is not str or not value or len(value) > MAX_STRING or "\0" in value
        ):
            raise ProtocolError(f"{key!r} must be a non-empty string of at most {MAX_STRING}")
    return fields


def decode_request(frame: bytes) -> Message:
    """Decode and validate one whole request frame (header + payload)."""
    kind, length = decode_header(frame[: HEADER.size])
    body = frame[HEADER.size :]
    if len(body) != length:
        raise ProtocolError(f"payload is {len(body)} bytes, the header says {length}")
    return Message(kind, validate_request(kind, decode_payload(body)))


def encode(kind: int, fields: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(fields or {}, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


# ------------------------------------------------------------------------------ socket I/O


def send(
    sock: socket.socket,
    kind: int,
    fields: dict[str, Any] | None = None,
    fds: list[int] | None = None,
) -> None:
    """Send one frame (with ``fds`` attached to its first byte)."""
    data = encode(kind, fields)
    if fds:
        if len(fds) > MAX_FDS_PER_FRAME:
            raise ProtocolError(f"{len(fds)} descriptors in one frame (limit {MAX_FDS_PER_FRAME})")
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


class Reader:
    """Reads frames from a socket, collecting any descriptors that arrive with them.

    ``accept_fds`` False (the daemon's side): receiving any descriptor is a protocol error (the
    descriptors are closed first). Every wait is bounded by the socket's timeout, and a whole
    frame by the deadline given to ``read``.
    """

    def __init__(
        self, sock: socket.socket, *, accept_fds: bool, max_fds: int = MAX_FDS_PER_FRAME
    ) -> None:
        self.sock = sock
        self.accept_fds = accept_fds
        self.max_fds = max_fds
        self._anc = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)

    def _recv_exact(
        self, n: int, fds: list[int], *, at_boundary: bool, deadline: float | None
    ) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no complete frame in time ({got} of {n} bytes)")
                self.sock.settimeout(left)
            data, anc, flags, _ = self.sock.recvmsg(
                n - got, self._anc, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
            )
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                    fds.extend(arr)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("ancillary data truncated (too many descriptors)")
            if fds and not self.accept_fds:
                raise ProtocolError("file descriptors sent to the daemon")
            if not data:
                if at_boundary and got == 0:
                    raise PeerClosed("connection closed")
                raise ProtocolError(f"connection closed inside a frame ({got} of {n} bytes)")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def read(self, *, deadline: float | None = None) -> Message:
        """The next frame. With ``deadline`` (a ``time.monotonic()`` value) the whole frame must
        arrive by then, however it trickles in (``TimeoutError`` otherwise); without one each
        receive is bounded by the socket's own timeout."""
        fds: list[int] = []
        try:
            head = self._recv_exact(HEADER.size, fds, at_boundary=True, deadline=deadline)
            kind, length = decode_header(head)
            body = (
                self._recv_exact(length, fds, at_boundary=False, deadline=deadline)
                if length
                else b""
            )
            return Message(kind, decode_payload(body), fds)
        except BaseException:
            close_fds(fds)
            raise


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
