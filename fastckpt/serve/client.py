"""Client of the ``fastckpt serve`` cache daemon: one connection, bounded waits, the replies
checked.

The load core asks the daemon through ``fastckpt.loader.daemonsource`` (its sealed memfds are one
of the core's byte sources); ``fastckpt cache --server`` uses ``Client`` for the daemon's own
requests (stats, ls, prefetch, evict).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from typing import Any

from fastckpt.serve import names, protocol


class ServerUnavailableWarning(RuntimeWarning):
    """The configured cache daemon could not serve a load; the files were read directly."""


class ServerRefused(Exception):
    """The daemon answered a request with an error (``code``: denied, bad_name, no_room, ...)."""

    def __init__(self, code: str, message: str, fields: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.fields = fields


class Client:
    """One connection to the daemon. Every wait is bounded by ``timeout_s``."""

    def __init__(self, socket_path: str, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(socket_path)
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
        self, kind: int, fields: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        """Send a request; return the OK reply's fields and the descriptors that came before it.
        Raises ServerRefused on an ERROR reply, TimeoutError when a fill stops progressing."""
        protocol.send(self.sock, kind, fields)
        fds: list[int] = []
        last_loaded = -1
        last_progress = time.monotonic()
        try:
            while True:
                msg = self.reader.read()
                if msg.kind == protocol.PROGRESS:
                    loaded = msg.fields.get("loaded")
                    if not isinstance(loaded, int):
                        raise protocol.ProtocolError("progress without a byte count")
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

    def get(self, path: str | os.PathLike[str], identity: str) -> tuple[dict[str, Any], list[int]]:
        root, name = self.locate(path)
        return self.request(protocol.GET, {"root": root, "name": name, "identity": identity})

    def prefetch(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        root, name = self.locate(path)
        return self.request(protocol.PREFETCH, {"root": root, "name": name})[0]

    def evict(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        root, name = self.locate(path)
        return self.request(protocol.EVICT, {"root": root, "name": name})[0]

    def evict_name(self, root: int, name: str) -> dict[str, Any]:
        return self.request(protocol.EVICT, {"root": root, "name": name})[0]

    def ls(self) -> dict[str, Any]:
        return self.request(protocol.LIST)[0]

    def stats(self) -> dict[str, Any]:
        return self.request(protocol.STATS)[0]


def check_memfd(fd: int, size: int) -> None:
    """A memfd from the daemon must hold ``size`` bytes and be sealed against writes, growth
    and shrinking (what the client checks is then what it uses)."""
    st = os.fstat(fd)
    if st.st_size != size:
        raise protocol.ProtocolError(f"memfd holds {st.st_size} bytes, the reply says {size}")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    need = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if seals & need != need:
        raise protocol.ProtocolError("the daemon sent a memfd that is not sealed")
