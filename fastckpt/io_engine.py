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

The copy pipeline (:func:`run_copy_pipeline`) is the GPU stage's loop: reads into pinned
staging slots, each completed read copied host -> device on one of several streams, slots
recycled by event query, all in C++ with the GIL released. Its device is a :class:`CopyBackend`:
:func:`cuda_copy_backend` (the CUDA driver, loaded at run time: the extension never links CUDA)
or :class:`FakeCopyBackend` (host memory and memcpy on worker threads, which checks that no
staging slot is overwritten before its copy ran). This part is internal to the loader: its
device addresses are plain ints, and the public API never shows them.

Everything outside this module reaches ``_core`` through it, except ``fastckpt.format.spec``,
which imports ``_core`` lazily for CRC32C and falls back to a table when it is not built. That is
why it is longer than 600 lines: it is the one gateway, for the engine and the copy pipeline.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

try:
    from fastckpt import _core
except ImportError as _exc:  # say what happened (usually: the source tree shadows the install)
    from fastckpt._core_missing import explain

    raise explain(_exc) from _exc
from fastckpt.config import Config, get_config

__all__ = [
    "PIN_METHODS",
    "AlignedBuffer",
    "Batch",
    "CancelFlag",
    "CopyBackend",
    "CopyOp",
    "CopyResult",
    "Engine",
    "FakeCopyBackend",
    "File",
    "PinnedBuffer",
    "RangeGate",
    "ReadOp",
    "SlotSource",
    "crc32c",
    "crc32c_combine",
    "cuda_copy_backend",
    "cuda_driver_problem",
    "default_crc_threads",
    "drop_page_cache",
    "engine_info",
    "residency",
    "run_copy_pipeline",
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


# ------------------------------------------------------------------------------ copy pipeline

#: The device side of :func:`run_copy_pipeline`: ``name`` ("cuda" | "fake") and ``streams``.
CopyBackend = _core.CopyBackend

#: Ways to make page-locked host memory (see :class:`PinnedBuffer`).
PIN_METHODS = ("register", "memfd", "alloc")


def cuda_driver_problem() -> str | None:
    """Why the CUDA driver (libcuda.so.1) cannot be loaded here, or None when it can."""
    return _core.cuda_driver_problem()


def cuda_copy_backend(device_index: int, stream_handles: Sequence[int]) -> CopyBackend:
    """A copy backend driving CUDA device ``device_index`` through the driver API.

    ``stream_handles`` are the streams to copy on, as integer handles
    (``torch.cuda.Stream(device).cuda_stream``); copies go round-robin over them. The backend
    retains the device's primary context (the one torch uses) and makes it current only around
    its own calls, so the calling thread's current device is unchanged. The streams must outlive
    the backend (torch's own streams do: they come from a pool that is never freed).

    Raises RuntimeError when the driver is missing ("CUDA driver libcuda.so.1 not found: ...")
    or a driver call fails (the message names the call and the CUDA error), ValueError for no
    streams or more than 64.
    """
    return _core.cuda_copy_backend(device_index, [int(h) for h in stream_handles])


class FakeCopyBackend(_core.FakeCopyBackend):
    """The test device: destinations are host addresses; each stream is a worker thread that
    sleeps ``delay_s`` per copy (a slow link) and then copies with memcpy, in order.

    It checks what a real device cannot: each copy hashes its source when enqueued and the bytes
    that landed when it ran; a difference (the source was overwritten, e.g. a staging slot reused,
    before the copy ran) counts in :attr:`violations`, the first few described in
    :attr:`violation_notes`. :attr:`max_in_flight` is the most copies enqueued and not yet run at
    once, across streams. Pinning is a counted no-op. Without ``check`` nothing is hashed;
    without ``copy`` nothing is copied either (a device that costs nothing, so that a benchmark
    sees only the pipeline's own overhead). ``_fail_after_copies`` (test hook) makes every copy
    after that many fail with RuntimeError.
    """

    def __init__(
        self,
        streams: int = 4,
        delay_s: float = 0.0,
        *,
        check: bool = True,
        copy: bool = True,
        _fail_after_copies: int = -1,
    ) -> None:
        super().__init__(
            streams, delay_s, check=check, copy=copy, _fail_after_copies=_fail_after_copies
        )

    @property
    def violations(self) -> int:
        return int(self.stats()["violations"])

    @property
    def violation_notes(self) -> list[str]:
        return list(self.stats()["violation_notes"])

    @property
    def copies(self) -> int:
        """Copies executed."""
        return int(self.stats()["copies"])

    @property
    def max_in_flight(self) -> int:
        return int(self.stats()["max_in_flight"])

    @property
    def pending(self) -> int:
        """Copies enqueued and not yet executed."""
        return int(self.stats()["pending"])

    def __repr__(self) -> str:
        return f"FakeCopyBackend(streams={self.streams})"


class PinnedBuffer(_core.PinnedBuffer):
    """Page-locked host memory for staging slots: a writable 1-D uint8 buffer
    (``torch.frombuffer(buf, dtype=torch.uint8)`` works and keeps it alive).

    ``method``: ``register`` (2 MiB-aligned anonymous memory advised for transparent huge pages,
    then registered with the device), ``memfd`` (a memfd mapping, then registered) or ``alloc``
    (the driver's own pinned allocation). Which is fastest depends on the machine: ``setup_s``
    says what this one cost. The memory is unpinned and freed when the last reference (this
    object, a view, a :class:`SlotSource`) goes. With a :class:`FakeCopyBackend` nothing is
    pinned; the memory is the same kind. Raises ValueError for ``nbytes`` <= 0 or an unknown
    method, OSError when the memory cannot be mapped, RuntimeError when pinning fails.
    """

    def __init__(self, backend: CopyBackend, nbytes: int, method: str = "register") -> None:
        super().__init__(backend, nbytes, method)

    def __repr__(self) -> str:
        return f"PinnedBuffer(nbytes={self.nbytes}, method={self.method!r})"


class RangeGate(_core.RangeGate):
    """Which byte ranges of a source (a file being downloaded) are ready to read.

    A producer calls ``mark_ready(lo, hi)`` as bytes ``[lo, hi)`` land, or ``fail(errno,
    message)``; a pipeline read carrying the gate starts only once its whole range is ready, and
    raises OSError (that errno, ``filename`` the gate's ``name``) when the gate fails. Thread-safe.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__(name)

    def __repr__(self) -> str:
        return f"RangeGate({self.name!r}, ready_bytes={self.ready_bytes})"


class SlotSource(_core.SlotSource):
    """The staging slots of a ring, ``slot_nbytes`` each, lent to copy pipelines.

    ``add(buffer)`` carves a :class:`PinnedBuffer` into ``buffer.nbytes // slot_nbytes`` slots
    (returns how many; a buffer joins one source only) and may be called while pipelines run:
    they pick the new slots up. A pipeline gives a slot back only after the last copy out of it
    completed, so every slot in the source is safe to overwrite. ``total``, ``available`` (not
    lent), ``running`` (pipelines).

    ``close(cancel_running=True, timeout_s=None)`` refuses new pipelines, stops running ones
    (unless ``cancel_running`` is False: then they finish), waits until every slot is back and
    lets the memory go (freed when no one else holds the buffers); False when ``timeout_s``
    passed first (the source stays closed; close again to wait more).
    """

    def __init__(self, slot_nbytes: int) -> None:
        super().__init__(slot_nbytes)

    def __repr__(self) -> str:
        return (
            f"SlotSource(slot_nbytes={self.slot_nbytes}, total={self.total}, "
            f"available={self.available}, closed={self.closed})"
        )


class CancelFlag(_core.CancelFlag):
    """``set()`` from any thread stops the pipelines running with this flag (RuntimeError)."""


#: A pipeline op: ``("read", file, file_offset, nbytes, dst_address, gate or None)`` reads into a
#: staging slot (``nbytes`` at most ``slot_nbytes``) and copies it to ``dst_address``;
#: ``("host", src_address, nbytes, dst_address)`` copies page-locked host memory directly.
CopyOp = tuple[str, File, int, int, int, RangeGate | None] | tuple[str, int, int, int]


def default_crc_threads() -> int:
    """Checksum workers of a pipeline run with ``crc``: half the CPUs, at most 8.

    Measured on an H200 box (16 cores, 4 GiB warm, 16 pread threads): 0 workers (the loop's
    thread) 10 GB/s, 2: 18, 4: 29, 8: 33, against 42 GB/s without checksums.
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class CopyResult:
    """What one :func:`run_copy_pipeline` did.

    ``crcs``: CRC32C of each op's bytes, in op order (empty unless ``crc``). Waits, in seconds:
    ``read_wait_s`` blocked while reads were in flight; ``copy_wait_s`` blocked on a copy while
    every held slot (or the host window) was busy; ``gate_wait_s`` on gates; ``slot_wait_s``
    holding no slot at all; ``drain_s`` for the last copies. ``slot_starved``: a read that could
    have started waited because every slot held was still copying (more slots would help).
    """

    crcs: tuple[int, ...]
    copies: int
    max_copies_in_flight: int
    max_reads_in_flight: int
    bytes_staged: int
    bytes_host: int
    read_wait_s: float
    copy_wait_s: float
    gate_wait_s: float
    slot_wait_s: float
    drain_s: float
    total_s: float
    slots_used: int
    slot_starved: bool


def run_copy_pipeline(
    engine: Engine,
    ops: Iterable[CopyOp],
    slots: SlotSource,
    backend: CopyBackend,
    *,
    crc: bool = False,
    crc_threads: int | None = None,
    cancel: CancelFlag | None = None,
    max_slots: int = 0,
    host_window: int = 16,
    gate_timeout_s: float | None = None,
    copy_poll_s: float = 1e-4,
    _crc_delay_s: float = 0.0,
) -> CopyResult:
    """Runs every op through read -> host-to-device copy; returns when all copies completed.

    Reads are submitted in op order into every free slot (at most ``max_slots`` held at once; 0:
    no limit); a completed read is copied on the next stream (round-robin) with an event after
    it, and its slot goes back once that event completed. Host ops are copied directly, at most
    ``host_window`` in flight. The loop blocks only when nothing can proceed (then on a read, or
    on the oldest copy; while reads and copies are both in flight, copies are polled every
    ``copy_poll_s``). With ``crc``, ``crc_threads`` workers (None: :func:`default_crc_threads`)
    checksum each op's bytes while the device copies them (0: the loop's own thread, about
    10 GB/s); a slot goes back once both are done (``_crc_delay_s``, a test hook, slows each
    worker checksum down). The GIL is released throughout; Ctrl-C on the main thread interrupts
    it.

    Raises ValueError for a bad op (nothing runs; a read longer than a slot is refused), OSError
    for a failed read or gate, TimeoutError when a read waits on its gate longer than
    ``gate_timeout_s``, RuntimeError for a failed copy or when cancelled (``cancel``, the slot
    source closing, the engine closing). Whatever happens, on return no read or copy of this
    call still touches a slot or a destination, and every slot is back in ``slots``.
    """
    raw = _core.run_copy_pipeline(
        engine._core,
        ops,
        slots,
        backend,
        crc=crc,
        crc_threads=default_crc_threads() if crc_threads is None else crc_threads,
        cancel=cancel,
        max_slots=max_slots,
        host_window=host_window,
        gate_timeout_s=gate_timeout_s,
        copy_poll_s=copy_poll_s,
        _crc_delay_s=_crc_delay_s,
    )
    raw["crcs"] = tuple(raw["crcs"])
    return CopyResult(**raw)
