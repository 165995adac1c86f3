"""Open a checkpoint's files beneath its directory, once, safely. No torch, no C++ core.

A ``CheckpointDir`` opens the checkpoint directory once (``O_DIRECTORY``) and resolves every
file the checkpoint names (the index, partitions, shards, carried files) relative to that
descriptor, so that:

- a directory swapped in meanwhile (a republish with ``overwrite=True``) is never mixed in: the
  descriptor keeps naming the directory that was opened, and a reader that keeps the returned
  descriptors reads exactly the files it validated;
- nothing resolves outside the directory: ``openat2(RESOLVE_BENEATH)`` where the kernel has it
  (Linux 5.6+), elsewhere an equivalent walk, one component at a time with ``O_NOFOLLOW``, that
  follows each symbolic link itself and refuses any step above the directory or to an absolute
  target. Escapes raise ``UnsafePathError`` (the outside file is never opened or stat'ed), link
  loops ``SymlinkLoopError``;
- nothing blocks: files are opened ``O_NONBLOCK | O_NOCTTY`` and ``fstat``-checked, and anything
  but a regular file is refused before a byte is read (``O_NONBLOCK`` is then cleared).

Symbolic links inside the directory are followed when they stay beneath it. A Hugging Face cache
snapshot (``<repo>/snapshots/<revision>/``, whose files link to ``../../blobs/<hash>``) is the one
layout whose links leave the checkpoint directory by design: when the directory's parent is
called ``snapshots`` and the grandparent holds a ``blobs`` directory, links are resolved beneath
the grandparent (the repo folder) instead. FORMAT.md section 8 states these rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastckpt.errors import FormatError, SymlinkLoopError, UnsafePathError

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_PATH = getattr(os, "O_PATH", 0)
READ_FLAGS = os.O_RDONLY | _O_CLOEXEC | _O_NONBLOCK | _O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | _O_CLOEXEC | _O_DIRECTORY

MAX_SYMLINKS = 40
"""Links followed while resolving one name (the kernel's own limit)."""

# openat2(2): the syscall number is 437 on every Linux architecture that has it.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_openat2_state: dict[str, object] = {}


def _libc_syscall() -> object | None:
    if "fn" not in _openat2_state:
        fn = None
        if platform.system() == "Linux":
            try:
                fn = ctypes.CDLL(None, use_errno=True).syscall
                fn.restype = ctypes.c_long
            except (OSError, AttributeError):  # pragma: no cover - exotic libc
                fn = None
        _openat2_state["fn"] = fn
    return _openat2_state["fn"]


def _openat2(dirfd: int, rel: str, flags: int) -> int | None:
    """``openat2(dirfd, rel, flags, RESOLVE_BENEATH)``; None when the kernel lacks it."""
    if _openat2_state.get("missing"):
        return None
    fn = _libc_syscall()
    if fn is None:  # pragma: no cover - not Linux
        _openat2_state["missing"] = True
        return None
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    while True:
        fd = fn(  # type: ignore[operator]
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(rel)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.ENOSYS, errno.EPERM) and not _openat2_state.get("works"):
            # ENOSYS: kernel < 5.6; EPERM: a seccomp filter that refuses the call.
            _openat2_state["missing"] = True
            return None
        raise OSError(err, os.strerror(err), rel)


def _walk(dirfd: int, rel: str, flags: int) -> int:
    """The portable equivalent of ``openat2(RESOLVE_BENEATH)``: resolve ``rel`` component by
    component beneath ``dirfd``, following symbolic links by hand; never above ``dirfd``."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    stack = [os.dup(dirfd)]  # directories walked so far; stack[0] is the confining one
    links = 0
    try:
        if not parts:
            return os.open(".", flags, dir_fd=stack[-1])
        while parts:
            comp = parts.pop(0)
            if comp == "..":
                if len(stack) == 1:
                    raise OSError(errno.EXDEV, "resolves outside the directory", rel)
                os.close(stack.pop())
                continue
            cur = stack[-1]
            st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(comp, dir_fd=cur)
                if target.startswith("/"):
                    raise OSError(errno.EXDEV, "absolute symbolic link", rel)
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if parts:
                stack.append(os.open(comp, _DIR_FLAGS | _O_NOFOLLOW, dir_fd=cur))
            else:
                # O_NOFOLLOW: a link swapped in since the stat cannot take us elsewhere.
                return os.open(comp, flags | _O_NOFOLLOW, dir_fd=cur)
        # The name ended in ".." or a link to a directory: open what we stand on.
        return os.open(".", flags, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def open_beneath(dirfd: int, rel: str, flags: int = READ_FLAGS, *, use_openat2: bool = True) -> int:
    """Open ``rel`` (a relative path) beneath the directory ``dirfd`` and return the descriptor.

    Raises ``OSError`` with ``EXDEV`` when the path (through ``..`` or a symbolic link) leaves
    the directory, ``ELOOP`` for link loops, and the usual errors (``ENOENT``, ...).
    ``use_openat2=False`` forces the portable walk (tests run both).
    """
    if rel.startswith("/"):
        raise OSError(errno.EXDEV, "absolute path", rel)
    if use_openat2:
        fd = _openat2(dirfd, rel, flags)
        if fd is not None:
            _openat2_state["works"] = True
            return fd
    return _walk(dirfd, rel, flags)


@dataclass(frozen=True)
class OpenFile:
    """A checked, open regular file: ``fd`` (owned by whoever holds this), its ``size``,
    ``dev``/``ino`` identity, and the ``path`` that names it in messages."""

    fd: int
    path: str
    size: int
    dev: int
    ino: int

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed
            os.close(self.fd)


def check_regular(
    fd: int, path: str, *, error: type[FormatError], what: str, close: bool = True
) -> OpenFile:
    """``fstat`` ``fd``; anything but a regular file raises ``error`` (closing ``fd`` first).

    For a regular file, ``O_NONBLOCK`` is cleared (it only mattered for opening).
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise error(f"{what} is {kind}", path=path)
        if _O_NONBLOCK:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            if fl & _O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~_O_NONBLOCK)
    except BaseException:
        if close:
            os.close(fd)
        raise
    return OpenFile(fd, path, st.st_size, st.st_dev, st.st_ino)


def open_path(path: str, *, error: type[FormatError], what: str) -> OpenFile:
    """Open a file the caller named explicitly (symbolic links followed as the user's own path),
    non-blocking, and require a regular file. ``FileNotFoundError`` passes through."""
    fd = os.open(path, READ_FLAGS)
    return check_regular(fd, path, error=error, what=what)


def _hf_repo(path: str) -> str | None:
    """The repo folder when ``path`` is a Hugging Face cache snapshot directory, else None."""
    parent = os.path.dirname(path)
    repo = os.path.dirname(parent)
    if os.path.basename(parent) != "snapshots" or not repo:
        return None
    return repo if os.path.isdir(os.path.join(repo, "blobs")) else None


class CheckpointDir:
    """A checkpoint directory opened once; its entries are opened beneath it.

    ``path`` is the directory as the caller named it (absolute), used in messages. Close it (or
    use it as a context manager) when done; files it opened stay open until their own close.
    """

    def __init__(self, path: str, *, use_openat2: bool = True) -> None:
        self.path = os.path.abspath(path)
        self._use_openat2 = use_openat2
        self.fd = os.open(self.path, _DIR_FLAGS)
        self._confine_fd = self.fd
        self._prefix = ""
        repo = _hf_repo(self.path)
        if repo is not None:
            try:
                self._confine_fd = os.open(repo, _DIR_FLAGS)
                rel = os.path.relpath(self.path, repo)
                probe = open_beneath(self._confine_fd, rel, _DIR_FLAGS, use_openat2=use_openat2)
                try:
                    same = os.path.samestat(os.fstat(probe), os.fstat(self.fd))
                finally:
                    os.close(probe)
                if same:
                    self._prefix = rel + "/"
                else:  # pragma: no cover - the cache changed under us
                    os.close(self._confine_fd)
                    self._confine_fd = self.fd
            except OSError:  # pragma: no cover - an odd cache layout: confine to the directory
                if self._confine_fd != self.fd:
                    os.close(self._confine_fd)
                self._confine_fd = self.fd

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._confine_fd != self.fd and self._confine_fd >= 0:
            os.close(self._confine_fd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self._confine_fd = -1

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- entries ------------------------------------------------------------------------------

    def join(self, name: str) -> str:
        """The path of entry ``name`` for messages."""
        return os.path.join(self.path, name)

    def listdir(self) -> list[str]:
        """The names in the directory that was opened (sorted)."""
        return sorted(os.listdir(self.fd))

    def _open_raw(self, name: str, flags: int) -> int:
        path = self.join(name)
        try:
            if "/" in name:  # a file in a sub-folder (carried tree): every component confined
                fd = None
            else:
                try:
                    # The common case, and the one that cannot mix generations: a plain entry of
                    # the directory that was opened.
                    fd = os.open(name, flags | _O_NOFOLLOW, dir_fd=self.fd)
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    fd = None
                if fd is not None:
                    if not flags & _O_PATH or not stat.S_ISLNK(os.fstat(fd).st_mode):
                        return fd
                    os.close(fd)  # O_PATH | O_NOFOLLOW opened the link itself
            # A symbolic link: follow it, beneath the directory (or the HF repo folder).
            if self._confine_fd == self.fd:
                return open_beneath(self.fd, name, flags, use_openat2=self._use_openat2)
            return open_beneath(
                self._confine_fd, self._prefix + name, flags, use_openat2=self._use_openat2
            )
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                where = "repo folder" if self._confine_fd != self.fd else "checkpoint directory"
                raise UnsafePathError(
                    f"{name!r} is a symbolic link that leads outside the {where}; checkpoint "
                    "files must resolve beneath it",
                    path=path,
                ) from None
            if exc.errno == errno.ELOOP:
                raise SymlinkLoopError(
                    f"{name!r} is a symbolic link that loops (or nests more than "
                    f"{MAX_SYMLINKS} links deep)",
                    path=path,
                ) from None
            if exc.filename is None or exc.filename != path:
                raise OSError(exc.errno, exc.strerror, path) from None
            raise

    def open(self, name: str, *, error: type[FormatError], what: str) -> OpenFile:
        """Open entry ``name`` (a plain file name) for reading: beneath the directory, never
        blocking, a regular file (else ``error``). ``FileNotFoundError`` passes through."""
        fd = self._open_raw(name, READ_FLAGS)
        return check_regular(fd, self.join(name), error=error, what=what)

    def is_file(self, name: str) -> bool:
        """True when entry ``name`` opens beneath the directory as a regular file."""
        flags = (_O_PATH or os.O_RDONLY | _O_NONBLOCK | _O_NOCTTY) | _O_CLOEXEC
        try:
            fd = self._open_raw(name, flags)
        except (OSError, FormatError):
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def has(self, name: str) -> bool:
        """True when the directory holds an entry ``name`` that is not a directory (a file, or a
        link, which ``open`` then resolves or refuses)."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return not stat.S_ISDIR(st.st_mode)

    def walk_files(self, *, max_depth: int, skip: Callable[[str], bool]) -> list[str]:
        """Relative paths (``a/b/c``) of the files in the sub-folders of the directory, sorted,
        at most ``max_depth`` folders deep. Entries for which ``skip(name)`` is true, and
        symbolic links to folders, are not entered; nothing outside the directory is visited."""
        out: list[str] = []

        def visit(rel: str, depth: int) -> None:
            fd = open_beneath(self.fd, rel, _DIR_FLAGS | _O_NOFOLLOW, use_openat2=False)
            try:
                names = sorted(os.listdir(fd))
                for name in names:
                    if skip(name):
                        continue
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if depth < max_depth:
                            visit(f"{rel}/{name}", depth + 1)
                    else:
                        out.append(f"{rel}/{name}")
            finally:
                os.close(fd)

        for name in self.listdir():
            if not skip(name) and self.is_dir(name):
                visit(name, 1)
        return out

    def is_dir(self, name: str) -> bool:
        """True when entry ``name`` is a directory (not a link to one) of the directory."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode)

    def exists(self, name: str) -> bool:
        """True when the directory holds an entry ``name`` of any kind."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True


class FileSet:
    """A checkpoint's files that are already open, by name: an object store's download landing in
    anonymous memory or in a staging directory. It answers what the format's readers ask of a
    ``CheckpointDir`` (``open``, ``listdir``, ``is_file``...), so a remote checkpoint is
    validated by the very code that validates a local one.

    ``path`` (the checkpoint's URL) names the files in messages and becomes the ``Index``'s
    root. ``files`` maps ``/``-separated relative names to open regular files; with ``resolve``,
    a name not among them is asked for (``resolve(name)`` returns its open file, or None when
    there is no such file), limited to ``listing`` when that is given (the names a listing of
    the store found). Files stay owned by the caller (``open`` hands out duplicates).
    """

    def __init__(
        self,
        path: str,
        files: dict[str, OpenFile] | None = None,
        *,
        listing: Iterable[str] | None = None,
        resolve: Callable[[str], OpenFile | None] | None = None,
    ) -> None:
        self.path = path
        self.files: dict[str, OpenFile] = dict(files or {})
        self._listing = None if listing is None else frozenset(listing)
        self._resolve = resolve
        self._missing: set[str] = set()

    def close(self) -> None:
        pass  # the files belong to the caller

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, name: str) -> OpenFile | None:
        f = self.files.get(name)
        if f is not None or self._resolve is None or name in self._missing:
            return f
        if self._listing is not None and name not in self._listing:
            return None
        f = self._resolve(name)
        if f is None:
            self._missing.add(name)
        else:
            self.files[name] = f
        return f

    def _names(self) -> set[str]:
        return set(self.files) | set(self._listing or ())

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def listdir(self) -> list[str]:
        return sorted(n for n in self._names() if "/" not in n)

    def open(self, name: str, *, error: type[FormatError], what: str) -> OpenFile:
        f = self._get(name)
        if f is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", self.join(name))
        return check_regular(os.dup(f.fd), self.join(name), error=error, what=what)

    def is_file(self, name: str) -> bool:
        return self._get(name) is not None

    def has(self, name: str) -> bool:
        return self._get(name) is not None

    def exists(self, name: str) -> bool:
        return self.has(name) or any(n.startswith(name + "/") for n in self._names())

    def is_dir(self, name: str) -> bool:
        return name not in self._names() and any(n.startswith(name + "/") for n in self._names())

    def walk_files(self, *, max_depth: int, skip: Callable[[str], bool]) -> list[str]:
        out = []
        for name in sorted(self._names()):
            parts = name.split("/")
            if 1 < len(parts) <= max_depth + 1 and not any(skip(p) for p in parts):
                out.append(name)
        return out


# What the format's readers read a checkpoint's files through.
Dir = CheckpointDir | FileSet


class OpenedFiles:
    """Files opened while reading one checkpoint; all closed unless handed over."""

    def __init__(self) -> None:
        self.partitions: list[OpenFile] = []
        self.carried: dict[str, OpenFile] = {}
        self.other: list[OpenFile] = []
        self.dirs: list[CheckpointDir] = []

    def close(self) -> None:
        for f in (*self.partitions, *self.carried.values()):
            f.close()
        self.partitions.clear()
        self.carried.clear()
        self.release()

    def release(self) -> None:
        """Close what the result does not keep (index files, directories)."""
        for f in self.other:
            f.close()
        self.other.clear()
        for d in self.dirs:
            d.close()
        self.dirs.clear()

    def dir(self, path: str) -> CheckpointDir:
        d = CheckpointDir(path)
        self.dirs.append(d)
        return d

    def keep(self, f: OpenFile) -> OpenFile:
        self.other.append(f)
        return f


__all__ = [
    "MAX_SYMLINKS",
    "READ_FLAGS",
    "CheckpointDir",
    "Dir",
    "FileSet",
    "OpenFile",
    "OpenedFiles",
    "check_regular",
    "open_beneath",
    "open_path",
]
