"""Typed wrappers around the C++ I/O engine (``fastckpt._core``).

The engine moves byte ranges from files into caller-owned memory and nothing else. A batch of
reads is submitted at once; completions are reported as they happen, so a caller can start the
next stage (a GPU copy, a checksum) chunk by chunk. Every blocking call releases the GIL.

Backends: io_uring (liburing) and a pread thread pool. ``auto`` uses io_uring for O_DIRECT reads
and the pool for buffered (page-cache) reads, which are memory copies that the pool spreads over
several cores; without a usable io_uring (not compiled in, seccomp, ``kernel.io_uring_disabled``,
an old kernel) everything runs on the pool, and :func:`engine_info` says why.

O_DIRECT: a :class:`File` opened with ``direct=True`` on a filesystem that accepts it reads the
4 KiB-aligned middle of each request through O_DIRECT and any unaligned head or tail through the
page cache. The middle is aligned only when the destination address and the file offset have the
same remainder modulo 4096 (for example an :class:`AlignedBuffer` read at ``dest_offset ==
file_offset % 4096``); otherwise the whole request is a buffered read. Either way the result is
exact to the byte.

Everything outside this module reaches ``_core`` through it, except ``fastckpt.format.spec``,
which imports ``_core`` lazily for CRC32C and falls back to a table when it is not built.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any

try:
    from fastckpt import _core
except ImportError as _exc:  # say what happened (usually: the source tree shadows the install)
    from fastckpt._core_missing import explain

    raise explain(_exc) from _exc
from fastckpt.config import Config, get_config

__all__ = [
    "AlignedBuffer",
    "Batch",
    "Engine",
    "File",
    "ReadOp",
    "crc32c",
    "crc32c_combine",
    "drop_page_cache",
    "engine_info",
    "residency",
]

#: One read: (file, file_offset, nbytes, dest, dest_offset, tag). ``dest`` is any writable,
#: C-contiguous buffer (AlignedBuffer, bytearray, numpy array, ``tensor.numpy()`` of a CPU tensor).
ReadOp = tuple["File", int, int, Any, int, int]

_KINDS = ("auto", "uring", "io_uring", "pread")


def _resolve_kind(kind: str | None, cfg: Config) -> str:
    if kind is None:
        kind = cfg.io_engine
    if not isinstance(kind, str) or kind.lower() not in _KINDS:
        raise ValueError(f"io engine {kind!r}: expected one of auto, uring, pread")
    kind = kind.lower()
    return "uring" if kind == "io_uring" else kind


def engine_info(kind: str | None = None) -> dict[str, Any]:
    """Which engine ``Engine(kind)`` would use, and why (no engine is started).

    ``kind`` None means the configured one (``FASTCKPT_IO_ENGINE``). The result has at least
    ``name`` ("io_uring" | "pread"), ``reason``, ``uring_compiled``, ``uring_usable``,
    ``uring_error`` (None when usable), ``liburing_version``, ``direct_reads`` and
    ``buffered_reads`` (the backend serving O_DIRECT and page-cache reads), ``queue_depth``,
    ``threads``, ``chunk_bytes`` and ``kind`` (the requested kind).

    Raises OSError when io_uring is forced (``uring``) but unavailable, as ``Engine`` would.
    """
    cfg = get_config()
    resolved = _resolve_kind(kind, cfg)
    info: dict[str, Any] = _core.engine_choice(
        resolved, cfg.queue_depth, cfg.resolved_io_threads(), cfg.chunk_bytes
    )
    info["kind"] = resolved
    return info


class AlignedBuffer(_core.AlignedBuffer):
    """Page-aligned anonymous memory (mmap), zero-filled; a writable 1-D uint8 buffer.

    ``torch.frombuffer(buf, dtype=torch.uint8)`` and ``numpy.frombuffer(buf, dtype=numpy.uint8)``
    give views that keep the buffer alive. With ``huge_pages`` (default), buffers of 2 MiB or more
    start on a 2 MiB boundary and are advised for transparent huge pages (``huge_pages`` attribute
    tells whether the advice was accepted). The memory is unmapped when the last reference (the
    object or a view of it) goes away. ``nbytes`` 0 is allowed.
    """

    def __init__(self, nbytes: int, *, huge_pages: bool = True) -> None:
        super().__init__(nbytes, huge_pages=huge_pages)

    def __repr__(self) -> str:
        return f"AlignedBuffer(nbytes={self.nbytes})"


class File(_core.File):
    """A file opened for reading by the engine.

    With ``direct`` (default) an O_DIRECT descriptor is opened too when the filesystem accepts it
    and is backed by a device; ``direct`` then reads True. It is False on tmpfs (nothing to
    bypass), on filesystems that refuse O_DIRECT, and when not requested; ``direct_note`` says
    why. ``size`` is the size at open; every submit re-checks ranges against the current size.

    Raises OSError (errno and filename set; FileNotFoundError, IsADirectoryError...) when the file
    cannot be opened or is not a regular file. With ``fd``, the file is that already-open
    descriptor (duplicated; the caller keeps its own) and ``path`` only names it in messages: the
    loader reads exactly the files it validated, whatever happens to the paths meanwhile.
    ``close()`` is idempotent; reads already submitted
    keep the descriptors open until they finish.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        direct: bool = True,
        fd: int | None = None,
        _allow_special: bool = False,
    ) -> None:
        super().__init__(
            path, direct=direct, _allow_special=_allow_special, fd=-1 if fd is None else fd
        )

    def __enter__(self) -> File:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("direct" if self.direct else "buffered")
        return f"File({self.path!r}, size={self.size}, {state})"


class Batch:
    """Reads submitted together. Keeps its files and destinations alive until they are done.

    Use as a context manager: leaving the block cancels whatever has not completed (a no-op
    when everything has), so no read can write into a destination after the block, exception
    or not.
    """

    def __init__(self, core: _core.Batch, engine: Engine) -> None:
        self._core = core
        self._engine = engine  # an engine dropped by the caller must outlive its batches

    def wait(self, min_completions: int = 1, timeout_s: float | None = None) -> list[int]:
        """Tags of requests completed since the last wait, in completion order.

        Blocks (GIL released) until at least ``min_completions`` unreported requests have
        completed, or all remaining ones have if fewer are left; ``[]`` when nothing is left.
        ``min_completions`` 0 polls. A failed read raises OSError (errno, a message naming the
        offset, ``filename`` the file) after cancelling the rest of the batch. A cancelled batch
        raises RuntimeError. When ``timeout_s`` passes first, TimeoutError is raised and nothing
        is consumed.
        """
        return self._core.wait(min_completions, timeout_s)

    def wait_all(self, timeout_s: float | None = None) -> None:
        """Waits until every read has completed (errors as for :meth:`wait`)."""
        self._core.wait(sys.maxsize, timeout_s)

    def cancel(self) -> None:
        """Drops queued reads and waits for running ones. Idempotent; later waits raise."""
        self._core.cancel()

    @property
    def pending(self) -> int:
        """Requests not yet returned by :meth:`wait` (0 once failed or cancelled)."""
        return self._core.pending

    @property
    def done(self) -> bool:
        """True when every request was returned by :meth:`wait`, or the batch stopped."""
        return self._core.done

    def __len__(self) -> int:
        return len(self._core)

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._core.cancel()


class Engine:
    """Executes batches of reads on io_uring or a pread thread pool.

    Args:
        kind: ``auto`` | ``uring`` | ``pread``; None means ``FASTCKPT_IO_ENGINE`` (config).
        queue_depth: reads in flight on io_uring (config ``queue_depth``).
        threads: pread pool threads (config ``io_threads``; 0 there means one per core).
        chunk_bytes: requests larger than this are split into pieces read in parallel; a
            multiple of 4096 (config ``chunk_bytes``).

    Raises ValueError for bad settings and OSError when ``uring`` is forced but unavailable.
    ``name`` is "io_uring" or "pread"; ``reason`` says why. Close it (or use ``with``) to stop
    its threads; closing cancels batches still running.
    """

    def __init__(
        self,
        kind: str | None = None,
        *,
        queue_depth: int | None = None,
        threads: int | None = None,
        chunk_bytes: int | None = None,
        _buffered_route: str = "default",
        _fault_after_bytes: int = -1,
        _fault_errno: int = errno.EIO,
    ) -> None:
        cfg = get_config()
        self._core = _core.Engine(
            _resolve_kind(kind, cfg),
            cfg.queue_depth if queue_depth is None else queue_depth,
            cfg.resolved_io_threads() if threads is None else threads,
            cfg.chunk_bytes if chunk_bytes is None else chunk_bytes,
            buffered_route=_buffered_route,
            _fault_after_bytes=_fault_after_bytes,
            _fault_errno=_fault_errno,
        )

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def reason(self) -> str:
        return self._core.reason

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def bytes_read(self) -> int:
        """Bytes this engine has read so far (all batches)."""
        return self._core.bytes_read

    @property
    def bytes_direct(self) -> int:
        """Of :attr:`bytes_read`, the bytes read through O_DIRECT."""
        return self._core.bytes_direct

    def _set_paused(self, paused: bool) -> None:
        """Test hook: hold queued reads (running ones finish) until unpaused."""
        self._core._set_paused(paused)

    def info(self) -> dict[str, Any]:
        """Like :func:`engine_info`, for this engine (its actual settings and choice)."""
        return self._core.info()

    def submit(self, reads: Iterable[ReadOp], *, _check_file_size: bool = True) -> Batch:
        """Validates every read, then queues them all; returns at once.

        Each read is ``(file, file_offset, nbytes, dest, dest_offset, tag)``. Raises ValueError
        naming the read when a range lies outside the file's current size or the destination,
        TypeError for a wrong type (not a File, not a writable C-contiguous buffer). Nothing is
        queued unless every read is valid. ``_check_file_size`` False is a test hook.
        """
        return Batch(self._core.submit(reads, _check_file_size=_check_file_size), self)

    def read(self, reads: Iterable[ReadOp], timeout_s: float | None = None) -> None:
        """Submits and waits for every read (see :meth:`submit` and :meth:`Batch.wait`)."""
        with self.submit(reads) as batch:
            batch.wait_all(timeout_s)

    def close(self) -> None:
        """Cancels queued reads, waits for running ones and stops the threads. Idempotent."""
        self._core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine(name={self.name!r}, closed={self.closed})"


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a C-contiguous buffer, continuing from ``value``. GIL released."""
    return _core.crc32c(data, value)


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A + B from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    return _core.crc32c_combine(crc_a, crc_b, len_b)


def residency(
    path: str | os.PathLike[str], *, sample_windows: int = 0, fd: int | None = None
) -> float:
    """Fraction (0..1) of the file's pages in the page cache; 1.0 for an empty file.

    With ``fd``, that open descriptor is queried (and left open); ``path`` names it in messages.

    Uses cachestat(2) where the kernel has it (Linux 6.5+), else mmap + mincore(2). An exact
    count costs about 4 ms per GiB; ``sample_windows=N`` estimates from N evenly spaced 64 KiB
    windows instead (what the loader does to choose its path).
    """
    if fd is not None:
        return _core.residency_fd(fd, os.fsdecode(path), "auto", sample_windows)
    return _core.residency(path, "auto", sample_windows)


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Evicts the file's pages from the page cache (fsync first when the file is writable).

    Used by benchmarks to measure cold reads without root (posix_fadvise DONTNEED). Pages that
    are mapped or locked by a process may stay.
    """
    _core.drop_page_cache(path)
