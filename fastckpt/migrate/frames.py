"""Frames of the migration transport and their authentication (``fastckpt.migrate.transport``
is the transport itself, and its docstring the protocol): a frame's encoding and limits, reading
and writing whole frames under a deadline, the shared secret, and the per-connection ``Session``
that tags and checks every frame with HMAC-SHA256."""

from __future__ import annotations

import hmac
import json
import socket
import struct
import time
from typing import Any

from fastckpt.migrate.errors import TransportError
from fastckpt.rules import peers

FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 64 << 20
TAG_BYTES = 32
NONCE_BYTES = 16
PROTOCOL = 1

Message = tuple[dict[str, Any], bytes]


class _Default:
    """``secret`` not given: use the file named by ``FASTCKPT_MIGRATE_SECRET_FILE``, if any."""


CONFIGURED = _Default()


def configured_secret() -> bytes | None:
    """The shared secret named by the configuration (``migrate_secret_file``), or None."""
    from fastckpt.config import get_config

    path = get_config().migrate_secret_file
    if not path:
        return None
    try:
        return peers.read_secret(path)
    except (OSError, ValueError) as exc:
        raise TransportError(f"FASTCKPT_MIGRATE_SECRET_FILE: {exc}") from exc


def _secret(secret: bytes | str | _Default | None) -> bytes | None:
    if isinstance(secret, _Default):
        return configured_secret()
    if isinstance(secret, str):
        secret = secret.encode()
    if secret is not None and len(secret) < peers.MIN_SECRET_BYTES:
        raise ValueError(f"a shared secret needs at least {peers.MIN_SECRET_BYTES} bytes")
    return secret


class Session:
    """The HMAC state of one authenticated connection, as seen from one side."""

    def __init__(self, secret: bytes, server_nonce: bytes, client_nonce: bytes, *, server: bool):
        self._key = hmac.new(secret, b"fastckpt-migrate-1" + server_nonce + client_nonce, "sha256")
        self._send_label, self._recv_label = (b"S>C", b"C>S") if server else (b"C>S", b"S>C")
        self._sent = 0
        self._received = 0

    def _tag(self, label: bytes, seq: int, frame: bytes) -> bytes:
        mac = self._key.copy()
        mac.update(label + seq.to_bytes(8, "little"))
        mac.update(frame)
        return mac.digest()

    def sign(self, frame: bytes) -> bytes:
        tag = self._tag(self._send_label, self._sent, frame)
        self._sent += 1
        return tag

    def check(self, frame: bytes, tag: bytes) -> None:
        want = self._tag(self._recv_label, self._received, frame)
        if not hmac.compare_digest(want, tag):
            raise TransportError(
                "frame failed its authentication tag (wrong secret, altered or replayed)"
            )
        self._received += 1


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise TransportError(f"message header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TransportError(f"message payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return FRAME.pack(len(raw), len(payload)) + raw + bytes(payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"timed out after receiving {len(buf)} of {n} bytes")
            sock.settimeout(left)
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


def recv_frame(
    sock: socket.socket, *, session: Session | None = None, deadline: float | None = None
) -> Message:
    """One frame; with ``deadline`` (a ``time.monotonic()`` value) the whole frame must arrive by
    then; with ``session`` its tag is checked before its header is even parsed."""
    head = _recv_exact(sock, FRAME.size, deadline)
    header_len, payload_len = FRAME.unpack(head)
    if header_len > MAX_HEADER_BYTES:
        raise TransportError(f"frame header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise TransportError(f"frame payload length {payload_len} exceeds {MAX_PAYLOAD_BYTES}")
    raw = _recv_exact(sock, header_len, deadline)
    payload = _recv_exact(sock, payload_len, deadline)
    if session is not None:
        session.check(head + raw + payload, _recv_exact(sock, TAG_BYTES, deadline))
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransportError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise TransportError("frame header must be a JSON object")
    return header, payload


def send_frame(
    sock: socket.socket,
    header: dict[str, Any],
    payload: bytes = b"",
    *,
    session: Session | None = None,
) -> None:
    data = encode_frame(header, payload)
    if session is not None:
        data += session.sign(data)
    try:
        sock.sendall(data)
    except OSError as e:
        raise TransportError(f"send failed: {e}") from e


def _hex_nonce(value: Any) -> bytes:
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise TransportError("handshake without a valid nonce")
    return nonce
