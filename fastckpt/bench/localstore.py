"""Object stores on 127.0.0.1 for the remote benchmark and the remote tests: moto's S3 server
(``moto.server.ThreadedMotoServer``, a real S3 implementation) and an HTTP file server with
ranged GETs. Both bind loopback only, bound their connections and time out idle peers; a
``with`` block starts and stops them.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import os
import posixpath
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 30.0
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def file_etag(st: os.stat_result) -> str:
    """A strong ETag for a file as it is now (inode, size, modification and change times)."""
    raw = f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}".encode()
    return '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the files under the server's root, one ``Range: bytes=a-b`` at most,
    ``If-Match`` honoured (412 when the file changed). Bodies go out with ``sendfile``."""

    protocol_version = "HTTP/1.1"
    server: RangeServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and benchmarks
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT_S)

    def _resolve(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        norm = posixpath.normpath("/" + path.lstrip("/"))
        if norm.startswith("/..") or "\0" in norm:
            return None
        full = os.path.join(self.server.root, norm.lstrip("/"))
        return full if os.path.isfile(full) else None

    def _error(self, code: int, message: str) -> None:
        body = message.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        self.server.requests += 1
        path = self._resolve()
        if path is None:
            self._error(404, "not found")
            return
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            etag = file_etag(st)
            want = self.headers.get("If-Match")
            if want is not None and want.strip() not in ("*", etag):
                self._error(412, "precondition failed")
                return
            size = st.st_size
            lo, hi = 0, size
            status = 200
            rng = self.headers.get("Range")
            if rng is not None:
                m = _RANGE.match(rng.strip())
                if m is None or (not m.group(1) and not m.group(2)):
                    self._error(416, "bad range")
                    return
                if m.group(1):
                    lo = int(m.group(1))
                    hi = min(size, int(m.group(2)) + 1) if m.group(2) else size
                else:
                    lo, hi = max(0, size - int(m.group(2))), size
                if lo >= size or hi <= lo:
                    self._error(416, "range not satisfiable")
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(hi - lo))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            if status == 206:
                self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{size}")
            self.end_headers()
            if not body:
                return
            self.wfile.flush()
            self.connection.sendfile(f, offset=lo, count=hi - lo)


class RangeServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 file server for ``root`` on 127.0.0.1 (a free port): ranged GETs, HEAD,
    ETags, ``If-Match``; at most ``MAX_CONNECTIONS`` connections at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str, port: int = 0) -> None:
        self.root = os.path.abspath(root)
        self.requests = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread: threading.Thread | None = None
        super().__init__((LOOPBACK, port), _RangeHandler)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with contextlib.suppress(ValueError):
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a peer that went away mid-response (the fault tests do that on purpose)

    def start(self) -> RangeServer:
        self._thread = threading.Thread(target=self.serve_forever, name="range-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1 with a bucket; ``env`` holds the variables a client needs
    (endpoint, region, test credentials)."""

    endpoint: str
    bucket: str
    _server: Any

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def upload_tree(self, local: str, prefix: str) -> str:
        """Upload a file or every file under a directory to ``prefix``; returns the s3:// URL."""
        s3 = self.client()
        if os.path.isfile(local):
            s3.upload_file(local, self.bucket, prefix)
            return f"s3://{self.bucket}/{prefix}"
        for dirpath, _, names in os.walk(local):
            for n in sorted(names):
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, local).replace(os.sep, "/")
                s3.upload_file(full, self.bucket, f"{prefix.rstrip('/')}/{rel}")
        return f"s3://{self.bucket}/{prefix.rstrip('/')}"


@contextlib.contextmanager
def s3_server(bucket: str = "models") -> Iterator[S3Server]:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port) with ``bucket`` made (versioned,
    so replaced objects get new version ids); stopped on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://{LOOPBACK}:{port}", bucket, server)
        client = s3.client()
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        yield s3
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


__all__ = ["LOOPBACK", "RangeServer", "S3Server", "file_etag", "s3_server"]
