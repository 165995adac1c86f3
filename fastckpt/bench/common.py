"""Small shared pieces of the harness: logging, page-cache control, filesystems (sizes and
their formatting: ``fastckpt.rules.units``).

Nothing here imports torch. Page-cache residency (through ``fastckpt.io_engine``) lets the
harness prove that a cold measurement really started cold.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fastckpt.rules.units import MiB

_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress line on stderr: wall-clock time and seconds since the harness started."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp} +{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# page cache


def drop_from_page_cache(paths: Iterable[str]) -> None:
    """Evict every page of ``paths`` from the page cache (no root needed; dirty pages are written
    first). On tmpfs this is a no-op: the file *is* its page cache."""
    from fastckpt.io_engine import drop_page_cache

    for path in paths:
        drop_page_cache(path)


def resident_bytes(path: str) -> tuple[int, int]:
    """``(bytes in the page cache, file size)`` for one file (an exact count)."""
    from fastckpt.io_engine import residency

    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    return min(size, round(residency(path) * size)), size


def resident_fraction(paths: Sequence[str]) -> float:
    """Fraction of the bytes of ``paths`` that are in the page cache (1.0 for no bytes)."""
    held = total = 0
    for path in paths:
        h, t = resident_bytes(path)
        held += h
        total += t
    return held / total if total else 1.0


def chunk_tasks(paths: Sequence[str], chunk_bytes: int) -> list[tuple[str, int, int]]:
    """``(path, offset, nbytes)`` for every ``chunk_bytes`` piece of ``paths``, in order."""
    tasks: list[tuple[str, int, int]] = []
    for path in paths:
        size = os.path.getsize(path)
        tasks.extend(
            (path, off, min(chunk_bytes, size - off)) for off in range(0, size, chunk_bytes)
        )
    return tasks


def parallel_pread(
    tasks: Sequence[tuple[str, int, int]],
    threads: int,
    dest: Callable[[int, int, int], memoryview],
    *,
    flags: int = 0,
) -> tuple[int, float]:
    """Read ``tasks`` with ``threads`` threads taking the next task in turn.

    ``dest(thread, task_index, nbytes)`` gives the memory a read lands in; ``flags`` are added to
    ``O_RDONLY`` (e.g. ``O_DIRECT``). Returns (bytes read, wall seconds of the reads); the first
    error in any thread is raised.
    """
    threads = max(1, threads)
    lock = threading.Lock()
    nxt = [0]
    done = [0] * threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        fds: dict[str, int] = {}
        try:
            while not errors:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(tasks):
                    return
                path, off, n = tasks[i]
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY | flags)
                done[k] += os.preadv(fd, [dest(k, i, n)], off)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    pool = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    t0 = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done), seconds


def read_through(paths: Sequence[str], *, chunk_bytes: int = 16 * MiB, threads: int = 4) -> int:
    """Read every byte of ``paths`` once (buffered) so that they sit in the page cache."""
    threads = max(1, threads)
    views = [memoryview(bytearray(chunk_bytes)) for _ in range(threads)]
    nbytes, _ = parallel_pread(
        chunk_tasks(paths, chunk_bytes), threads, lambda k, i, n: views[k][:n]
    )
    return nbytes


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
