"""Client of the ``fastckpt serve`` cache daemon: one connection, its peer checked, bounded waits,
the replies checked.

The load core asks the daemon through ``fastckpt.loader.daemonsource`` (its sealed memfds are one
of the core's byte sources); ``fastckpt cache --server`` uses ``Client`` for the daemon's own
requests (stats, ls, prefetch, evict).

Before anything is sent or read, the client checks who answers on the socket (``SO_PEERCRED``):
the daemon must run as this user, as root, or as ``server_uid`` (``FASTCKPT_SERVER_UID``);
otherwise ``UntrustedPeerError`` (a ``PermissionError``): another user who bound the socket's path
first is never believed. Every wait is bounded: a frame by ``timeout_s``, a fill that stops
progressing by ``timeout_s``, one whole answer by ``fill_wait_s`` (``server_fill_wait_s``); progress
that makes no sense is a protocol error at once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from typing import Any

from fastckpt.config import get_config
from fastckpt.rules import peers
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


def check_memfd(fd: int, size: int) -> None:
    """A memfd from the daemon must be a regular (shmem) file of ``size`` bytes, sealed against
    writes, growth and shrinking (what the client checks is then what it uses)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise protocol.ProtocolError("the daemon sent a descriptor that is not a memfd")
    if st.st_size != size:
        raise protocol.ProtocolError(f"memfd holds {st.st_size} bytes, the reply says {size}")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    need = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if seals & need != need:
        raise protocol.ProtocolError("the daemon sent a memfd that is not sealed")
