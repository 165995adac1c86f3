"""Who is on the other end of a local socket, and where a socket or a secret may live.

One rule for every local server and client of the library (the cache daemon, the migration
transport's Unix sockets):

- ``peer_credentials``: the pid, uid and gid of the process at the other end of a connected
  Unix socket (``SO_PEERCRED``: taken by the kernel when the peer connected or listened, so the
  peer cannot lie about them);
- ``trusted_server``: a client trusts a server run by its own uid, by root, or by a uid it was
  configured to trust; anything else is refused before a byte of it is used;
- ``check_private_dir``: a directory where a socket may be created, or a secret kept: owned by
  the caller (or root), writable by nobody else, and every directory above it either writable
  only by its owner (root or the caller) or sticky. A directory others can write, sticky ones
  such as ``/tmp`` included, lets another user bind the path first or swap the socket;
- ``read_secret``: a shared secret from a file readable by its owner only.

Pure standard library: no torch, no C++ core.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from dataclasses import dataclass

_CREDS = struct.Struct("3i")
MIN_SECRET_BYTES = 16


class UntrustedPeerError(PermissionError):
    """The process at the other end of a local socket is not one this side trusts."""


class UnsafeLocationError(PermissionError):
    """A directory or file that others can write (or read, for a secret)."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """Credentials of the peer of a connected ``AF_UNIX`` socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    pid, uid, gid = _CREDS.unpack(raw)
    return Peer(pid, uid, gid)


def trusted_server(sock: socket.socket, what: str, extra_uid: int = 0, knob: str = "") -> Peer:
    """The server's credentials, checked: its uid must be this process's, root's or
    ``extra_uid``; raises ``UntrustedPeerError`` naming the uid (and ``knob``, the setting that
    trusts another user) otherwise."""
    peer = peer_credentials(sock)
    if peer.uid not in (os.getuid(), 0, extra_uid):
        how = f" (to trust that user, set {knob})" if knob else ""
        raise UntrustedPeerError(
            f"{what} is run by uid {peer.uid} (pid {peer.pid}), not by this user (uid "
            f"{os.getuid()}) or root; refusing to use it{how}"
        )
    return peer


def private_dir_hint() -> str:
    return (
        "use a directory only you can write, e.g. $XDG_RUNTIME_DIR/fastckpt (per user) or "
        "/run/fastckpt (a system service: systemd's RuntimeDirectory=)"
    )


def check_private_dir(directory: str, *, create: bool = False) -> None:
    """Check (or create, mode ``0700``) ``directory`` as a private place for a socket or a
    secret; raises ``UnsafeLocationError`` saying what is wrong and where to go instead."""
    directory = os.path.abspath(directory)
    me = os.getuid()
    if create and not os.path.lexists(directory):
        _check_ancestors(os.path.dirname(directory), me)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeLocationError(f"{directory!r} is a symbolic link; {private_dir_hint()}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeLocationError(f"{directory!r} is not a directory")
    if st.st_uid not in (me, 0):
        raise UnsafeLocationError(
            f"{directory!r} belongs to uid {st.st_uid}, not to this user (uid {me}) or root; "
            + private_dir_hint()
        )
    if st.st_mode & 0o022:
        sticky = (
            " (sticky, like /tmp: anyone can still create names in it)"
            if (st.st_mode & stat.S_ISVTX)
            else ""
        )
        raise UnsafeLocationError(
            f"{directory!r} is writable by others (mode {st.st_mode & 0o7777:o}){sticky}: "
            f"another user could take the socket's name first or replace it; {private_dir_hint()}"
        )
    _check_ancestors(os.path.dirname(directory), me)


def _check_ancestors(path: str, me: int) -> None:
    """Every directory from ``path`` up to ``/``: owned by root or the caller, and writable by
    others only when sticky (then nobody else can rename what the caller made in it)."""
    path = os.path.abspath(path)
    while True:
        st = os.stat(path)
        if st.st_uid not in (me, 0):
            raise UnsafeLocationError(
                f"{path!r} (above the socket's directory) belongs to uid {st.st_uid}, who could "
                f"replace what lies below it; {private_dir_hint()}"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeLocationError(
                f"{path!r} (above the socket's directory) is writable by others (mode "
                f"{st.st_mode & 0o7777:o}), who could rename the directory below it; "
                + private_dir_hint()
            )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def read_secret(path: str) -> bytes:
    """The shared secret in ``path``: a regular file owned by this user (or root), readable and
    writable by its owner only, of at least ``MIN_SECRET_BYTES`` (surrounding whitespace
    ignored)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeLocationError(f"secret file {path!r} is not a regular file")
        if st.st_uid not in (os.getuid(), 0):
            raise UnsafeLocationError(f"secret file {path!r} belongs to uid {st.st_uid}")
        if st.st_mode & 0o077:
            raise UnsafeLocationError(
                f"secret file {path!r} is readable or writable by others (mode "
                f"{st.st_mode & 0o777:o}); chmod 600 it"
            )
        data = os.read(fd, 1 << 16).strip()
    finally:
        os.close(fd)
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret file {path!r} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} are "
            "needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
        )
    return data
