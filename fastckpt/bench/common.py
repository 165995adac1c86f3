"""Small shared pieces of the harness: sizes, logging, page-cache control, filesystems.

Nothing here imports torch. Page-cache residency is read with ``mincore(2)`` through ctypes so
the harness can prove that a cold measurement really started cold.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GB = 1_000_000_000
MiB = 1 << 20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([0-9]+))?\s*([A-Za-z]*)\s*$")
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Parse ``2GB``, ``512MiB``, ``8M``, ``1e9`` into bytes (decimal units unless ``*iB``)."""
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise ValueError(f"size {text!r} is not a number with an optional unit (e.g. 2GB, 512MiB)")
    number, exponent, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"size {text!r}: unknown unit {unit!r}; "
            "use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    value = float(number) * (10 ** int(exponent) if exponent else 1) * factor
    return int(value)


def format_bytes(nbytes: float) -> str:
    """Decimal units, three significant digits: ``7.81 GB``, ``512 MB``."""
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress line on stderr: wall-clock time and seconds since the harness started."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp} +{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# page cache


def drop_from_page_cache(paths: Iterable[str]) -> None:
    """Evict every page of ``paths`` from the page cache (no root needed).

    Dirty pages are written first (``fsync``), since ``POSIX_FADV_DONTNEED`` skips them. On
    tmpfs this is a no-op: the file *is* its page cache.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            # some filesystems refuse fsync on a read-only descriptor; the drop still works
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Libc:
    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None

    @classmethod
    def get(cls) -> ctypes.CDLL:
        with cls._lock:
            if cls._lib is None:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_long,
                ]
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
                cls._lib = lib
            return cls._lib


_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes((b & 1) for b in range(256))


def resident_bytes(path: str) -> tuple[int, int]:
    """``(bytes in the page cache, file size)`` for one file, read with ``mincore(2)``."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    libc = _Libc.get()
    fd = os.open(path, os.O_RDONLY)
    try:
        import mmap as _mmap

        addr = libc.mmap(None, size, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap for mincore failed: {os.strerror(err)}", path)
        try:
            npages = (size + PAGE_BYTES - 1) // PAGE_BYTES
            vec = ctypes.create_string_buffer(npages)
            if libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore failed: {os.strerror(err)}", path)
            pages = vec.raw[:npages].translate(_LOW_BIT).count(1)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(pages * PAGE_BYTES, size), size


def resident_fraction(paths: Sequence[str]) -> float:
    """Fraction of the bytes of ``paths`` that are in the page cache (1.0 for no bytes)."""
    held = total = 0
    for path in paths:
        h, t = resident_bytes(path)
        held += h
        total += t
    return held / total if total else 1.0


def read_through(paths: Sequence[str], *, chunk_bytes: int = 16 * MiB, threads: int = 4) -> int:
    """Read every byte of ``paths`` once (buffered) so that they sit in the page cache."""
    tasks: list[tuple[str, int, int]] = []
    for path in paths:
        size = os.path.getsize(path)
        tasks.extend(
            (path, off, min(chunk_bytes, size - off)) for off in range(0, size, chunk_bytes)
        )
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0}
    errors: list[BaseException] = []

    def work() -> None:
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        fds: dict[str, int] = {}
        try:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] = i + 1
                if i >= len(tasks) or errors:
                    return
                path, off, n = tasks[i]
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                got = os.preadv(fd, [view[:n]], off)
                with lock:
                    state["bytes"] += got
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(max(1, threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return state["bytes"]


# ---------------------------------------------------------------------------------------------
# filesystems and the machine


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    device: str
    fstype: str


def mount_of(path: str) -> Mount:
    """The mount that holds ``path`` (longest matching mount point in /proc/self/mounts)."""
    real = os.path.realpath(path)
    best = Mount("/", "?", "?")
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return best
    best_len = -1
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/") or mnt == "/"
        if inside and len(mnt) > best_len:
            best, best_len = Mount(mnt, parts[0], parts[2]), len(mnt)
    return best


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where unavailable)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    except OSError:
        pass
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2.0
