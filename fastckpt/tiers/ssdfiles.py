"""The SSD tier's files, apart from the tier itself (``fastckpt.tiers.ssd``): how a source is
keyed (stamps of its files, a SHA-256 tree hash of their bytes), the lock a process holds while
it fills an entry, and what a tier directory holds (``scan``, ``describe``, ``clear``: the
``fastckpt cache`` command reads a directory without a tier)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

HASH_PIECE_BYTES = 64 << 20
STAMP_FILE = ".last-used"
META_FILE = ".source.json"

Stamp = list[int]  # [st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]


def file_stamp(st: os.stat_result) -> Stamp:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def source_files(index: Any) -> list[str]:
    """The files whose bytes make a source's content: its data files and, for a directory, the
    files a conversion carries over (config, tokenizer...)."""
    out = [p.path for p in index.partitions]
    if os.path.isdir(index.root):
        for rel in (*index.files, *index.tree):
            full = os.path.join(index.root, rel)
            if os.path.isfile(full) and full not in out:
                out.append(full)
    return out


def stamp_key(files: Iterable[str], root: str) -> str:
    """A hash of the source's resolved path and each file's stamp: cheap (``stat`` calls), and
    different after any write to a file (its ctime moves). Raises OSError for a missing file."""
    h = hashlib.sha256(os.path.realpath(root).encode())
    for path in sorted(files):
        st = os.stat(path)
        h.update(f"\0{path}\0{file_stamp(st)}".encode())
    return h.hexdigest()[:32]


def content_key(files: Iterable[str], threads: int = 4) -> str:
    """SHA-256 tree hash of the files' bytes (each ``HASH_PIECE_BYTES`` piece hashed on a thread
    pool, then the pieces' digests with each file's name and size): the content's identity."""
    paths = sorted(files, key=os.path.basename)
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        sizes = [os.fstat(fd).st_size for fd in fds]
        pieces = [(i, off) for i, n in enumerate(sizes) for off in range(0, n, HASH_PIECE_BYTES)]

        def piece(job: tuple[int, int]) -> bytes:
            i, off = job
            n = min(HASH_PIECE_BYTES, sizes[i] - off)
            h = hashlib.sha256()
            while n > 0:
                data = os.pread(fds[i], min(n, 8 << 20), off)
                if not data:
                    raise OSError(errno.EIO, f"{paths[i]} ended while it was hashed")
                h.update(data)
                off += len(data)
                n -= len(data)
            return h.digest()

        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="fastckpt-hash") as pool:
            digests = list(pool.map(piece, pieces))
    finally:
        for fd in fds:
            os.close(fd)
    top = hashlib.sha256(b"fastckpt-ssd-content-1")
    at = 0
    for i, path in enumerate(paths):
        count = -(-sizes[i] // HASH_PIECE_BYTES)
        top.update(f"\0{os.path.basename(path)}\0{sizes[i]}\0".encode())
        for d in digests[at : at + count]:
            top.update(d)
        at += count
    return top.hexdigest()[:32]


def disk_usage(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


@dataclass(frozen=True)
class SsdEntry:
    key: str
    path: str
    nbytes: int
    last_used: float
    source: str


def scan(directory: str) -> list[SsdEntry]:
    """Entries in ``directory``, least recently used first (for ``fastckpt cache ls``)."""
    out: list[SsdEntry] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            last = os.stat(os.path.join(path, STAMP_FILE)).st_mtime
        except OSError:
            last = 0.0
        source = ""
        try:
            with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
                source = str(json.load(f).get("source", ""))
        except (OSError, ValueError):
            pass
        out.append(SsdEntry(name, path, disk_usage(path), last, source))
    out.sort(key=lambda e: e.last_used)
    return out


def read_meta(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


class FlightLock:
    """An exclusive ``flock`` on a lock file of the tier directory, held by the process that
    fills an entry; the kernel lets it go when that process dies, however it dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """True once held; False when another process held it for ``timeout_s``. Waits in
        short slices, so Ctrl-C interrupts it."""
        import fcntl

        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(poll_s)
                continue
            except BaseException:
                os.close(fd)
                raise
            try:  # the file may have been removed by its last holder meanwhile: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def release(self, *, remove: bool = True) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(fd)


def owner_gone(name: str) -> bool:
    """Whether the process that staged ``name`` (``.tmp-<key>-<pid>-<n>`` or the writer's
    ``..tmp-<key>-<pid>-<n>.tmp-...``) is gone (its leftovers can go)."""
    try:
        pid = int(name.lstrip(".")[4:].split(".")[0].split("-")[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clear(directory: str) -> tuple[int, int]:
    """Delete every entry (and leftover temporary directory) of an SSD tier directory; returns
    (entries, bytes) removed."""
    entries = scan(directory)
    removed = sum(e.nbytes for e in entries)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0, 0
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
    return len(entries), removed


def describe(entries: list[SsdEntry]) -> list[dict[str, Any]]:
    return [
        {"key": e.key, "nbytes": e.nbytes, "last_used": e.last_used, "source": e.source}
        for e in entries
    ]


__all__ = [
    "HASH_PIECE_BYTES",
    "META_FILE",
    "STAMP_FILE",
    "FlightLock",
    "SsdEntry",
    "Stamp",
    "clear",
    "content_key",
    "describe",
    "disk_usage",
    "file_stamp",
    "owner_gone",
    "read_meta",
    "scan",
    "source_files",
    "stamp_key",
]
