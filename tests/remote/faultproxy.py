"""A small fault-injecting HTTP proxy on 127.0.0.1, between fastckpt and a real server (moto's S3
server, the ranged HTTP file server).

Each client connection is served in its own thread: requests are read (HTTP/1.1, keep-alive),
forwarded to the upstream server on a connection of the proxy's own, and the response is written
back, unless a ``Fault`` matches the request first. A fault fires a given number of times, for
requests whose method and path match, optionally only from the ``after``-th match on:

- ``slowdown``: answer 503 with S3's ``SlowDown`` error (not forwarded);
- ``expired``: answer 403 with S3's ``ExpiredToken`` error (not forwarded);
- ``drop``: forward, send the headers and the first ``keep`` body bytes, then close the
  connection (a connection dropped mid-range);
- ``truncate``: forward, send only ``keep`` body bytes with a ``Content-Length`` that says so
  (a short but well-formed response);
- ``corrupt``: forward, flip one bit of the body at ``keep``;
- ``stall``: forward, send the headers, then send nothing for ``seconds`` (a stalled server);
- ``hook``: call ``action()`` (say, replace the object upstream), then forward.

Bounded: at most 64 connections at once, every socket times out after 30 s idle, ``stop()``
closes them all. Counts of requests seen (``requests``, ``log``) and faults fired (``fired``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 64
TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 64 << 10

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message></Error>"
)


@dataclass
class Fault:
    kind: str
    times: int = 1
    method: str = "GET"  # "": any method
    path_contains: str = ""
    ranged_only: bool = True  # only requests with a Range header (data, not identity probes)
    after: int = 0  # skip this many matching requests first
    keep: int = 0
    seconds: float = 0.0
    action: Callable[[], None] | None = None
    seen: int = 0
    fired: int = 0
    fired_ranges: list[str] = field(default_factory=list)  # the Range header of each firing

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.fired >= self.times or self.method not in ("", method):
            return False
        if self.path_contains not in path:
            return False
        if self.ranged_only and "range" not in headers:
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        self.fired += 1
        self.fired_ranges.append(headers.get("range", ""))
        return True


@dataclass
class FaultProxy:
    upstream: str  # "127.0.0.1:port"
    faults: list[Fault] = field(default_factory=list)
    requests: int = 0
    # (method, path, Range header or "") of every request, in arrival order (bounded)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(MAX_CONNECTIONS)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._conns: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._sock.getsockname()[1]}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests = 0
            self.log.clear()

    def fired(self, kind: str) -> int:
        with self._lock:
            return sum(f.fired for f in self.faults if f.kind == kind)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (Linux)
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            conn.settimeout(TIMEOUT_S)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        try:
            reader = conn.makefile("rb")
            while not self._stopping:
                head = _read_head(reader)
                if head is None:
                    return
                method, path, headers, raw_headers = head
                body = reader.read(int(headers.get("content-length", "0") or 0))
                with self._lock:
                    self.requests += 1
                    if len(self.log) < 10_000:
                        self.log.append((method, path, headers.get("range", "")))
                    fault = next((f for f in self.faults if f.matches(method, path, headers)), None)
                if fault is not None and fault.kind in ("slowdown", "expired"):
                    code, text, payload = (
                        (503, "Slow Down", _SLOWDOWN)
                        if fault.kind == "slowdown"
                        else (403, "Forbidden", _EXPIRED)
                    )
                    conn.sendall(
                        f"HTTP/1.1 {code} {text}\r\nContent-Type: application/xml\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n".encode()
                        + (payload if method != "HEAD" else b"")
                    )
                    continue
                if fault is not None and fault.kind == "hook" and fault.action is not None:
                    fault.action()
                if upstream is None:
                    host, port = self.upstream.rsplit(":", 1)
                    upstream = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
                upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in raw_headers:
                    upstream.putheader(k, v)
                upstream.endheaders(body or None)
                resp = upstream.getresponse()
                payload = resp.read()
                out_headers = [
                    (k, v)
                    for k, v in resp.getheaders()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                ]
                keep = min(fault.keep, len(payload)) if fault is not None else len(payload)
                length = len(payload)
                if method == "HEAD":
                    length = int(resp.getheader("Content-Length", "0") or 0)
                if fault is not None and fault.kind == "truncate":
                    payload, length = payload[:keep], keep
                if fault is not None and fault.kind == "corrupt" and payload:
                    b = bytearray(payload)
                    b[keep % len(b)] ^= 0x40
                    payload = bytes(b)
                lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                lines += [f"{k}: {v}" for k, v in out_headers]
                lines.append(f"Content-Length: {length}")
                conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                if method == "HEAD":
                    continue
                if fault is not None and fault.kind == "drop":
                    conn.sendall(payload[:keep])
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.kind == "stall":
                    time.sleep(fault.seconds)
                conn.sendall(payload)
        except (OSError, http.client.HTTPException):
            return
        finally:
            if upstream is not None:
                upstream.close()
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()


def _read_head(
    reader: object,
) -> tuple[str, str, dict[str, str], list[tuple[str, str]]] | None:
    lines: list[bytes] = []
    total = 0
    while True:
        line = reader.readline(MAX_HEADER_BYTES)  # type: ignore[attr-defined]
        if not line:
            return None
        total += len(line)
        if total > MAX_HEADER_BYTES:
            return None
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
    if not lines:
        return None
    method, path, _ = lines[0].decode("latin-1").split(" ", 2)
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        raw.append((k.strip(), v.strip()))
    return method, path, {k.lower(): v for k, v in raw}, raw
