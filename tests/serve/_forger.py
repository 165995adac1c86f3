"""A hostile stand-in for the cache daemon: speaks the daemon's protocol, serves forged bytes.

Standalone on purpose (standard library only, no fastckpt import): the tests run it in a thread
of the test process (a daemon of the client's own uid) and as another user's process
(``python3 -I -S _forger.py SOCKET ROOT SIZES MODE``, started with a uid of its own), which can
read nothing of the checkpoint and only knows its partition sizes.

Modes:
- ``forge``: answers ``get`` with sealed memfds full of ``0x41`` bytes of the right sizes, the
  identity the client asked for, and ``verified: true``;
- ``overrun``: answers ``get`` with progress frames whose ``loaded`` passes ``total``;
- ``crawl``: answers ``get`` with progress frames that advance one byte at a time, forever.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("<4sHHI")
HELLO, GET, OK, PROGRESS, FDS = 1, 2, 100, 102, 103
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _send(conn: socket.socket, kind: int, fields: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(fields).encode()
    data = HEADER.pack(b"FCKS", 1, kind, len(body)) + body
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.sendall(data)


def _recv(conn: socket.socket) -> tuple[int, dict]:
    head = b""
    while len(head) < HEADER.size:
        chunk = conn.recv(HEADER.size - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    _, _, kind, length = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return kind, json.loads(body or b"{}")


def _memfd(size: int) -> int:
    fd = os.memfd_create("forged", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"\x41" * size, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def _serve_one(conn: socket.socket, root: str, sizes: list[int], mode: str) -> None:
    with conn:
        while True:
            try:
                kind, fields = _recv(conn)
            except (EOFError, OSError):
                return
            if kind == HELLO:
                _send(conn, OK, {"version": 1, "roots": [root], "pid": os.getpid()})
            elif kind == GET and mode == "forge":
                fds = [_memfd(n) for n in sizes]
                _send(conn, FDS, {"first": 0, "count": len(fds)}, fds)
                for fd in fds:
                    os.close(fd)
                reply = {"identity": fields["identity"], "sizes": sizes, "verified": True}
                _send(conn, OK, reply)
            elif kind == GET:
                total = sum(sizes)
                loaded = total + 1 if mode == "overrun" else 0
                try:
                    while True:
                        _send(conn, PROGRESS, {"loaded": loaded, "total": total})
                        loaded += 1
                        time.sleep(0.02)
                except OSError:
                    return
            else:
                _send(conn, OK, {})


def bind(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(0.1)
    return listener


def serve(
    listener: socket.socket, root: str, sizes: list[int], mode: str, stop: threading.Event
) -> None:
    """Serve on a bound socket until ``stop`` is set."""
    with listener:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=_serve_one, args=(conn, root, sizes, mode), daemon=True).start()


def start_thread(path: str, root: str, sizes: list[int], mode: str) -> threading.Event:
    """Bind ``path`` now and serve on a thread; set the returned event to stop."""
    stop = threading.Event()
    listener = bind(path)
    threading.Thread(target=serve, args=(listener, root, sizes, mode, stop), daemon=True).start()
    return stop


if __name__ == "__main__":
    sock, root_dir, size_list, how = sys.argv[1:5]
    bound = bind(sock)
    os.chmod(sock, 0o777)
    print("ready", flush=True)
    serve(bound, root_dir, json.loads(size_list), how, threading.Event())
