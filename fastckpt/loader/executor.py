"""Execute a ``LoadPlan``: allocate one buffer per (partition, device), move the bytes, make views.

CPU buffers are read straight into their final memory (O_DIRECT when the file is not cached), or,
when a partition is already in the page cache, mapped privately and populated by the kernel (no
copy at all). GPU buffers are filled through the process-wide pinned staging ring: chunk reads
into ring slots, asynchronous host-to-device copies on several CUDA streams, and each slot reused
once the CUDA event of its copy has completed.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.errors import CorruptDataError, TruncatedError
from fastckpt.format import dtypes
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.format.reader import open_partitions
from fastckpt.loader.checks import ChunkVerifier
from fastckpt.loader.plan import BufferPlan, LoadPlan, ReadOp, ViewPlan
from fastckpt.loader.staging import get_ring

# Fraction of a partition in the page cache above which reads go through the page cache.
BUFFERED_MIN_RESIDENT = 0.5
# Windows sampled to estimate residency: an exact count costs ~4 ms per GiB, a sample ~0.1 ms.
RESIDENCY_SAMPLES = 256

_engines: dict[tuple[str, int, int, int], io_engine.Engine] = {}
_engines_lock = threading.Lock()


def get_engine(kind: str, cfg: Config) -> io_engine.Engine:
    """A process-wide engine per kind and settings (engines serve concurrent batches)."""
    threads = cfg.resolved_io_threads()
    key = (kind, cfg.queue_depth, threads, cfg.chunk_bytes)
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None:
            eng = io_engine.Engine(
                kind, queue_depth=cfg.queue_depth, threads=threads, chunk_bytes=cfg.chunk_bytes
            )
            _engines[key] = eng
        return eng


@dataclass
class Timings:
    alloc_s: float = 0.0
    read_wait_s: float = 0.0
    copy_wait_s: float = 0.0
    ring_s: float = 0.0
    finalize_s: float = 0.0
    verify_s: float = 0.0
    paths: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)


class _Files:
    """The partitions' open files: the descriptors the index was validated against (``opened``,
    from ``open_checkpoint``; else opened beneath ``index.root`` now), and engine files made from
    them on demand, O_DIRECT or buffered. Nothing is ever opened by path again, so a directory
    republished meanwhile cannot be mixed in."""

    def __init__(self, index: Index, opened: Sequence[OpenFile] | None = None) -> None:
        self._index = index
        self._owned = opened is None
        self._opened: Sequence[OpenFile] | None = opened
        self._open: dict[tuple[int, bool], io_engine.File] = {}
        self._lock = threading.Lock()

    def opened(self, partition: int) -> OpenFile:
        """The validated open file of ``partition``."""
        with self._lock:
            if self._opened is None:
                self._opened = open_partitions(self._index)
            return self._opened[partition]

    def get(self, partition: int, direct: bool) -> io_engine.File:
        key = (partition, direct)
        src = self.opened(partition)
        with self._lock:
            f = self._open.get(key)
            if f is None:
                part = self._index.partitions[partition]
                f = io_engine.File(part.path, direct=direct, fd=src.fd)
                if f.size < part.nbytes:
                    f.close()
                    raise TruncatedError(
                        f"partition is {f.size} bytes, the index needs {part.nbytes}; "
                        "it changed after the index was read",
                        path=part.path,
                    )
                self._open[key] = f
            return f

    def close(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.close()
            self._open.clear()
            if self._owned and self._opened is not None:
                for o in self._opened:
                    o.close()
                self._opened = None


def _is_cached(f: OpenFile, threshold: float) -> bool:
    try:
        residency = io_engine.residency(f.path, sample_windows=RESIDENCY_SAMPLES, fd=f.fd)
    except OSError:
        return False
    return residency >= threshold


class Executor:
    def __init__(
        self,
        index: Index,
        plan: LoadPlan,
        *,
        engine_kind: str,
        verify: bool,
        cfg: Config,
        files: Sequence[OpenFile] | None = None,
    ) -> None:
        self.index = index
        self.plan = plan
        self.cfg = cfg
        self._engine_kind = engine_kind
        self._engine: io_engine.Engine | None = None
        self.files = _Files(index, files)
        self.timings = Timings()
        self.verifier = (
            ChunkVerifier(plan.checks, [p.path for p in index.partitions])
            if verify and plan.checks
            else None
        )
        # buffer index -> (uint8 tensor on its device, base: file offset the views are relative
        # to, or None when views use the plan's rel_offset)
        self.buffers: dict[int, torch.Tensor] = {}
        self.mapped: dict[int, int] = {}
        self.views_s = 0.0
        self._cached: dict[tuple[int, float], bool] = {}

    # ----------------------------------------------------------------- helpers
    @property
    def engine(self) -> io_engine.Engine:
        """The I/O engine, started on first use (a load served by mappings needs none)."""
        if self._engine is None:
            self._engine = get_engine(self._engine_kind, self.cfg)
        return self._engine

    @property
    def engine_name(self) -> str:
        if self._engine is not None:
            return self._engine.name
        return "none"

    def cached(self, partition: int, threshold: float = BUFFERED_MIN_RESIDENT) -> bool:
        """Is at least ``threshold`` of the partition in the page cache? Then buffered reads
        (or a mapping) beat O_DIRECT, which would go to the device for every byte."""
        key = (partition, threshold)
        hit = self._cached.get(key)
        if hit is None:
            hit = _is_cached(self.files.opened(partition), threshold)
            self._cached[key] = hit
        return hit

    def _crc_feed(self, buffer: int, dest_offset: int, data: Any) -> None:
        if self.verifier is None:
            return
        t0 = time.perf_counter()

        def crc_of(rel: int, n: int) -> int:
            return io_engine.crc32c(data[rel : rel + n])

        self.verifier.feed(buffer, dest_offset, len(data), crc_of)
        self.timings.add("verify_s", time.perf_counter() - t0)

    # ----------------------------------------------------------------- CPU
    def _map_buffer(self, b: BufferPlan) -> torch.Tensor:
        """Map the partition range of ``b`` privately; tensors become views of page cache pages
        (copy-on-write: writing to a tensor copies that page, never the file). Returns a uint8
        tensor whose element 0 is file byte ``start``.

        The mapping is not pre-faulted: page tables fill on first touch, many pages per fault
        (the kernel's fault-around), which measured faster than MADV_POPULATE_READ here (2 GB,
        2-core VM: 0.033 s vs 0.236 s median to mapped-and-touched). MAP_POPULATE is worse
        still: on a writable private mapping it write-faults, i.e. copies, every page.
        """
        start = b.segments[0][0]
        end = b.segments[-1][1]
        part = self.index.partitions[b.partition]
        src = self.files.opened(b.partition)
        size = os.fstat(src.fd).st_size
        if size < part.nbytes:  # the mapping would end past the file: SIGBUS on touch
            raise TruncatedError(
                f"partition is {size} bytes, the index needs {part.nbytes}; it changed after "
                "the index was read",
                path=part.path,
                offset=size,
            )
        try:
            mm = mmap.mmap(
                src.fd,
                end - start,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except ValueError:  # shrunk since the fstat: "mmap length is greater than file size"
            raise TruncatedError(
                "partition shrank after the index was read", path=part.path, offset=start
            ) from None
        self.mapped[b.index] = start
        return torch.frombuffer(mm, dtype=torch.uint8)

    def _load_cpu(self, bufs: Sequence[BufferPlan]) -> None:
        reads: list[tuple[Any, ...]] = []
        arrays: dict[int, Any] = {}
        t0 = time.perf_counter()
        for b in bufs:
            if b.nbytes == 0:
                self.buffers[b.index] = torch.empty(0, dtype=torch.uint8)
                continue
            if (
                self.cfg.cpu_map_cached
                and self.verifier is None
                and self.cached(b.partition, self.cfg.mmap_min_resident)
            ):
                self.buffers[b.index] = self._map_buffer(b)
                self.timings.paths.add("cpu-mmap")
                continue
            mem = io_engine.AlignedBuffer(b.nbytes)
            self.buffers[b.index] = torch.frombuffer(mem, dtype=torch.uint8)
            arrays[b.index] = memoryview(mem)
            self.timings.paths.add("cpu-read")
        self.timings.add("alloc_s", time.perf_counter() - t0)
        ops = [r for r in self.plan.reads if r.buffer in arrays]
        for tag, r in enumerate(ops):
            f = self.files.get(r.partition, direct=not self.cached(r.partition))
            reads.append((f, r.file_offset, r.nbytes, arrays[r.buffer], r.dest_offset, tag))
        if not reads:
            return
        t0 = time.perf_counter()
        batch = self.engine.submit(reads)
        with batch:
            if self.verifier is None:
                batch.wait_all()
            else:
                while True:
                    w0 = time.perf_counter()
                    done = batch.wait(1)
                    self.timings.add("read_wait_s", time.perf_counter() - w0)
                    if not done:
                        break
                    for tag in done:
                        r = ops[tag]
                        view = arrays[r.buffer][r.dest_offset : r.dest_offset + r.nbytes]
                        self._crc_feed(r.buffer, r.dest_offset, view)
                return
        self.timings.add("read_wait_s", time.perf_counter() - t0)

    # ----------------------------------------------------------------- GPU
    def _load_gpu(self, device: str, bufs: Sequence[BufferPlan]) -> None:
        dev = torch.device(device)
        t0 = time.perf_counter()
        for b in bufs:
            self.buffers[b.index] = torch.empty(b.nbytes, dtype=torch.uint8, device=dev)
        self.timings.add("alloc_s", time.perf_counter() - t0)
        mine = {b.index for b in bufs}
        ops = [r for r in self.plan.reads if r.buffer in mine]
        if not ops:
            return
        slot_bytes = max(self.cfg.ring_slot_bytes, max(r.nbytes for r in ops))
        t0 = time.perf_counter()
        ring = get_ring(slot_bytes, self.cfg.ring_bytes, self.cfg.pin_method)
        self.timings.add("ring_s", time.perf_counter() - t0)
        with torch.cuda.device(dev):
            streams = [torch.cuda.Stream(device=dev) for _ in range(max(1, self.cfg.copy_streams))]
            try:
                self._pipeline(ops, ring, streams)
            finally:
                # also on failure: no copy may still target a buffer that is about to be freed
                t0 = time.perf_counter()
                for s in streams:
                    s.synchronize()
                self.timings.add("finalize_s", time.perf_counter() - t0)
        self.timings.paths.add(
            "gpu-staged-cached"
            if all(self.cached(b.partition) for b in bufs)
            else "gpu-staged-direct"
        )

    def _pipeline(self, ops: Sequence[ReadOp], ring: Any, streams: Sequence[Any]) -> None:
        """Reads into ring slots -> H2D copies; at most ``ring.slots`` reads in flight.

        Every slot taken from the ring goes back to it, on success and on failure; a slot whose
        copy may still be running carries that copy's event, which the ring waits on before
        handing the slot out again.
        """
        pending: deque[tuple[Any, ReadOp, Any]] = deque()  # (batch, op, slot) in submit order
        next_op = 0
        copies = 0
        held: Any = None  # a slot taken from the ring and not yet in ``pending``
        try:
            while next_op < len(ops) or pending:
                # keep the ring busy: submit reads for every free slot
                while next_op < len(ops):
                    w0 = time.perf_counter()
                    held = ring.try_acquire() if pending else ring.acquire()
                    self.timings.add("copy_wait_s", time.perf_counter() - w0)
                    if held is None:
                        break
                    op = ops[next_op]
                    f = self.files.get(op.partition, direct=not self.cached(op.partition))
                    batch = self.engine.submit([(f, op.file_offset, op.nbytes, held.array, 0, 0)])
                    pending.append((batch, op, held))
                    held = None
                    next_op += 1
                batch, op, held = pending.popleft()
                w0 = time.perf_counter()
                batch.wait_all()
                self.timings.add("read_wait_s", time.perf_counter() - w0)
                if self.verifier is not None:
                    self._crc_feed(op.buffer, op.dest_offset, memoryview(held.array)[: op.nbytes])
                stream = streams[copies % len(streams)]
                copies += 1
                dst = self.buffers[op.buffer]
                with torch.cuda.stream(stream):
                    dst[op.dest_offset : op.dest_offset + op.nbytes].copy_(
                        held.tensor[: op.nbytes], non_blocking=True
                    )
                    event = torch.cuda.Event()
                    event.record(stream)
                held.event = event
                ring.release(held)
                held = None
        except BaseException:
            if held is not None:
                ring.release(held)
            for batch, _, slot in pending:
                batch.cancel()
                ring.release(slot)
            raise

    # ----------------------------------------------------------------- run
    def run(self) -> dict[str, torch.Tensor]:
        by_device: dict[str, list[BufferPlan]] = {}
        for b in self.plan.buffers:
            by_device.setdefault(b.device, []).append(b)
        try:
            jobs: list[tuple[Any, tuple[Any, ...]]] = []
            for device, bufs in by_device.items():
                if device == "cpu":
                    jobs.append((self._load_cpu, (bufs,)))
                else:
                    jobs.append((self._load_gpu, (device, bufs)))
            if len(jobs) == 1:
                fn, args = jobs[0]
                fn(*args)
            else:
                _run_parallel(jobs)
            if self.verifier is not None:
                self.verifier.finish()
            t0 = time.perf_counter()
            views = self._views()
            self.views_s = time.perf_counter() - t0
            return views
        except BaseException:
            self.buffers.clear()
            raise
        finally:
            self.files.close()

    def _views(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for v in self.plan.views:
            out[v.name] = self._view(v)
        for alias, target in self.plan.aliases.items():
            out[alias] = out[target]
        return out

    def _view(self, v: ViewPlan) -> torch.Tensor:
        buf = self.buffers[v.buffer]
        dt = dtypes.torch_dtype(v.dtype, tensor=v.name)
        if v.nbytes == 0:
            return torch.empty(v.shape, dtype=dt, device=buf.device)
        if v.buffer in self.mapped:
            entry = self.index.tensors[v.name]
            rel = entry.offset - self.mapped[v.buffer]
        else:
            rel = v.rel_offset
        raw = buf[rel : rel + v.nbytes]
        if v.dtype == "bool" and bool((raw > 1).any()):  # FORMAT.md 3: one rule with convert
            raise CorruptDataError(
                "bool tensor holds bytes other than 0 and 1",
                path=self.index.partitions[self.index.tensors[v.name].partition].path,
                tensor=v.name,
            )
        itemsize = dtypes.get(v.dtype).itemsize
        if rel % itemsize:
            # Not aligned for its dtype: cannot be a view; give it memory of its own.
            own = torch.empty(v.shape, dtype=dt, device=buf.device)
            own.reshape(-1).view(torch.uint8).copy_(raw)
            return own
        return raw.view(dt).view(v.shape)


def _run_parallel(jobs: Sequence[tuple[Any, tuple[Any, ...]]]) -> None:
    errors: list[BaseException] = []

    def runner(fn: Any, args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=runner, args=(fn, args), name="fastckpt-load") for fn, args in jobs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
