"""Atomic publication of a checkpoint directory (FORMAT.md section 1). Imports no torch.

A writer fills a temporary sibling directory ``.<name>.tmp-<random>`` next to the destination,
flushes every file, writes the index last, and only then renames the directory into place and
flushes the parent. A crash or an exception at any point leaves either the old destination or
nothing there; the temporary directory is removed on every failure this process survives
(``fastckpt convert`` turns SIGTERM into an exception for that). A ``SIGKILL`` can leave a hidden
``.tmp-`` sibling behind, which never loads as a checkpoint at the destination's path; its name
records the owner (host, pid, process start time), and the next write to the same destination
removes it once that owner is certainly gone (``sweep_stale``).

Replacing an existing destination (``overwrite=True``) swaps the two directories with one
``renameat2(RENAME_EXCHANGE)`` where the kernel and file system support it, so the old checkpoint
stays in place and valid until the new one is. Elsewhere it falls back to moving the old one aside
first (briefly, nothing sits at the destination; the old copy stays valid beside it until the new
one is in place). Only a fastckpt checkpoint or an empty directory is ever replaced: anything else
at the destination is refused, so a mistyped path cannot delete unrelated data.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Iterator
from types import TracebackType

from fastckpt.errors import DestinationExistsError
from fastckpt.format.spec import INDEX_FILE

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_path(path: str, *, directory: bool = False) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if directory:
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exists_message(dst: str) -> str:
    return "destination already exists; pass overwrite=True (CLI: --overwrite) to replace it"


def _refuse_message(dst: str, what: str) -> str:
    return (
        f"destination exists and is {what}; fastckpt only replaces a fastckpt checkpoint or an "
        "empty directory (remove it yourself or choose another destination)"
    )


def check_destination(dst: str, *, overwrite: bool, marker: str = INDEX_FILE) -> None:
    """Raise ``DestinationExistsError`` unless ``dst`` may be created or replaced (with
    ``overwrite``: an empty directory, or one holding ``marker``, the file that makes a
    directory one of ours: a checkpoint's index, an export's manifest).

    Cheap; called before any work so that a long conversion does not fail at its very end. A
    destination that ``overwrite`` could not replace either (a file, a link, a directory that is
    not ours) is refused with that reason, never with a suggestion to overwrite.
    """
    if not os.path.lexists(dst):
        return
    why = _irreplaceable(dst, marker)
    if why is not None:
        raise DestinationExistsError(errno.EEXIST, _refuse_message(dst, why), dst)
    if not overwrite:
        raise DestinationExistsError(errno.EEXIST, _exists_message(dst), dst)


def _irreplaceable(dst: str, marker: str) -> str | None:
    """Why an existing ``dst`` is nothing of ours that may be replaced (None: it may be)."""
    if os.path.islink(dst):
        return "a symbolic link"
    if not os.path.isdir(dst):
        return "a file, not a directory (a fastckpt checkpoint is a directory)"
    if os.path.lexists(os.path.join(dst, marker)):
        return None
    try:
        empty = not os.listdir(dst)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    what = "a fastckpt index" if marker == INDEX_FILE else marker
    return None if empty else f"a non-empty directory without {what}"


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False where the platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


class Terminated(BaseException):
    """Raised in the main thread by ``sigterm_raises`` when SIGTERM arrives."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (like Ctrl-C raises KeyboardInterrupt),
    so that ``Staging`` removes its temporary directory. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _start_time(pid: int) -> str:
    """The kernel's start time of process ``pid`` (clock ticks since boot), "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _owner_tag() -> str:
    """``<host>-<pid>-<start time>``: who owns a temporary directory (for the stale sweep)."""
    host = f"{zlib.crc32(socket.gethostname().encode()):08x}"
    pid = os.getpid()
    return f"{host}-{pid}-{_start_time(pid) or 0}"


_TMP_NAME = re.compile(
    r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+"
)


def _owner_gone(host: str, pid: int, start: str) -> bool:
    """True only when the owner certainly no longer runs: same host, and no process with that
    pid, or one that started at another time (the pid was reused)."""
    if host != f"{zlib.crc32(socket.gethostname().encode()):08x}":
        return False  # another machine (a shared file system): cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process exists (another user's)
    now = _start_time(pid)
    return bool(now) and start != "0" and now != start


def sweep_stale(dst: str) -> list[str]:
    """Remove the destination's own stale temporary siblings (``.<name>.tmp-...`` and
    ``.<name>.old-...`` left by a writer killed with SIGKILL) whose owner is gone. Returns the
    removed paths. Directories of running writers, other names and unknown layouts are kept."""
    parent, name = os.path.split(os.path.abspath(dst))
    removed: list[str] = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_NAME.fullmatch(entry)
        if m is None or m.group("name") != name:
            continue
        if not _owner_gone(m.group("host"), int(m.group("pid")), m.group("start")):
            continue
        full = os.path.join(parent, entry)
        if os.path.islink(full) or not os.path.isdir(full):
            continue
        _remove_tree(full)
        removed.append(full)
    return removed


def _remove_tree(path: str, marker: str = INDEX_FILE) -> None:
    """Remove a directory; its index (``marker``) goes first so a half-removed tree never looks
    valid."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, marker))
    shutil.rmtree(path, ignore_errors=True)


class Staging:
    """A temporary sibling directory that becomes ``dst`` on ``publish()``.

    Use as a context manager: leaving the block without ``publish()`` (an exception,
    ``KeyboardInterrupt``) removes the temporary directory and everything in it.
    """

    def __init__(self, dst: str, *, overwrite: bool, marker: str = INDEX_FILE) -> None:
        dst = os.path.abspath(os.fspath(dst))
        name = os.path.basename(dst)
        if not name:
            raise ValueError(f"destination {dst!r} has no directory name")
        self.dst = dst
        self.overwrite = overwrite
        self.parent = os.path.dirname(dst)
        self.path = ""
        self.published = False
        self.marker = marker
        self._name = name

    def __enter__(self) -> Staging:
        check_destination(self.dst, overwrite=self.overwrite, marker=self.marker)
        os.makedirs(self.parent, exist_ok=True)
        sweep_stale(self.dst)
        tag = _owner_tag()
        for _ in range(16):
            candidate = os.path.join(self.parent, f".{self._name}.tmp-{tag}-{secrets.token_hex(6)}")
            try:
                os.mkdir(candidate, 0o755)
            except FileExistsError:
                continue
            self.path = candidate
            return self
        raise FileExistsError(errno.EEXIST, "could not create a temporary directory", self.parent)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.published:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary directory (idempotent)."""
        if self.path and os.path.lexists(self.path):
            _remove_tree(self.path, self.marker)

    def publish(self) -> None:
        """Flush the temporary directory and rename it to ``dst`` (replacing per ``overwrite``).

        The caller has written and flushed every file, the index last.
        """
        if self.published:
            raise RuntimeError("already published")
        fsync_path(self.path, directory=True)
        check_destination(self.dst, overwrite=self.overwrite, marker=self.marker)
        if not os.path.lexists(self.dst):
            try:
                # os.rename would silently replace an empty directory created meanwhile; that
                # is allowed only with overwrite, which check_destination enforced above.
                os.rename(self.path, self.dst)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not self.overwrite:
                    raise DestinationExistsError(
                        errno.EEXIST, _exists_message(self.dst), self.dst
                    ) from None
                raise
            self.published = True
            fsync_path(self.parent, directory=True)
            return
        # Replace: the old checkpoint stays valid until the new one is in place.
        if _rename_exchange(self.path, self.dst):
            self.published = True
            fsync_path(self.parent, directory=True)
            _remove_tree(self.path, self.marker)  # now holds the old checkpoint
            return
        aside = os.path.join(
            self.parent, f".{self._name}.old-{_owner_tag()}-{secrets.token_hex(6)}"
        )
        os.rename(self.dst, aside)
        try:
            os.rename(self.path, self.dst)
        except BaseException:
            os.rename(aside, self.dst)
            raise
        self.published = True
        fsync_path(self.parent, directory=True)
        _remove_tree(aside, self.marker)


__all__ = [
    "Staging",
    "Terminated",
    "check_destination",
    "fsync_path",
    "sigterm_raises",
    "sweep_stale",
]
