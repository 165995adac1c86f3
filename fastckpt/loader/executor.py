"""Carry out the policy's decisions for a ``LoadPlan``: allocate buffers, move bytes, make views.

The executor decides nothing: for each buffer the policy (``fastckpt.loader.policy``) says where
its bytes come from, and the byte sources are handed in (``Sources``): partition files through
``open_partition`` and the engine, DRAM-tier blocks, GPU-tier buffers.

CPU buffers are mapped privately (copy-on-write views of the page cache or of a DRAM-tier block,
no copy) or read straight into their final memory. GPU buffers are revived from the GPU tier,
copied from a DRAM-tier block (pinned piece by piece as the copies reach it), or filled through the
Loader's pinned staging ring: chunk reads into ring slots, asynchronous host-to-device copies on
several CUDA streams, each slot reused once the CUDA event of its copy has completed.

Why one module of this size: the CPU paths, the GPU pipeline and the DRAM fill share one
byte-source seam (``Sources``, ``open_partition``) and one set of timings; the pure decisions
live in ``policy``.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.errors import CorruptDataError, TruncatedError
from fastckpt.format import dtypes
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.loader.checks import ChunkVerifier
from fastckpt.loader.plan import BufferPlan, LoadPlan, ReadOp, ViewPlan
from fastckpt.loader.policy import Decision, mixed_split

PAGE = 4096


def _check_size(index: Index, partition: int, size: int) -> None:
    part = index.partitions[partition]
    if size < part.nbytes:  # a read or a mapping would end past the file
        raise TruncatedError(
            f"partition is {size} bytes, the index needs {part.nbytes}; "
            "it changed after the index was read",
            path=part.path,
            offset=size,
        )


def open_partition(index: Index, partition: int, src: OpenFile, *, direct: bool | None) -> Any:
    """The one place the loader opens a partition file, always from ``src``: the descriptor the
    index was validated against (``fastckpt.format.reader.open_checkpoint``), never by path again,
    so a checkpoint republished meanwhile cannot be mixed in. Returns an engine ``File`` (O_DIRECT
    when ``direct``, else buffered) or, with ``direct=None``, a duplicate descriptor for mapping
    (the caller closes it). Raises TruncatedError when the file is now shorter than the index."""
    if direct is None:
        _check_size(index, partition, os.fstat(src.fd).st_size)
        return os.dup(src.fd)
    f = io_engine.File(index.partitions[partition].path, direct=direct, fd=src.fd)
    try:
        _check_size(index, partition, f.size)
    except BaseException:
        f.close()
        raise
    return f


@dataclass
class Sources:
    """Where bytes can come from, handed to the executor.

    ``files[i]`` is partition i's validated open file, and ``open_partition(index, partition,
    files[partition], direct=...)`` makes what a read or a mapping needs from it; ``dram`` maps
    a partition index to a host block holding the whole partition (file offset = block offset);
    ``gpu`` maps a buffer index to a device tensor revived from the GPU tier; ``engine`` returns
    the I/O engine (started on first use); ``ring`` returns a staging ring for a slot size.
    """

    engine: Callable[[], io_engine.Engine]
    files: Sequence[OpenFile] = ()
    ring: Callable[[int], Any] | None = None
    open_partition: Callable[..., Any] = open_partition
    dram: Mapping[int, Any] = field(default_factory=dict)
    gpu: Mapping[int, Any] = field(default_factory=dict)
    # frees memory a cache keeps on a device (the GPU tier's idle buffers); returns bytes freed
    reclaim: Callable[[str], int] | None = None


@dataclass
class Timings:
    alloc_s: float = 0.0
    read_wait_s: float = 0.0
    copy_wait_s: float = 0.0
    ring_s: float = 0.0
    finalize_s: float = 0.0
    verify_s: float = 0.0
    notes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)


class _Files:
    """Engine files made on demand (O_DIRECT or buffered) from the partitions' validated open
    files, closed together."""

    def __init__(self, index: Index, files: Sequence[OpenFile], opener: Callable[..., Any]) -> None:
        self._index = index
        self._files = files
        self._opener = opener
        self._open: dict[tuple[int, bool], io_engine.File] = {}
        self._lock = threading.Lock()

    def get(self, partition: int, direct: bool) -> io_engine.File:
        key = (partition, direct)
        with self._lock:
            f = self._open.get(key)
            if f is None:
                f = self._opener(self._index, partition, self._files[partition], direct=direct)
                self._open[key] = f
            return f

    def close(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.close()
            self._open.clear()


def direct_for(decision: str, partition_range: tuple[int, int], file_offset: int) -> bool:
    """Whether a read at ``file_offset`` uses O_DIRECT under a buffer's decision."""
    if decision == "direct":
        return True
    if decision == "mixed":
        return file_offset >= mixed_split(*partition_range)
    return False


class Executor:
    """Runs one load: ``run()`` returns ``{name: tensor}``; ``buffers`` then holds each buffer's
    tensor (the GPU tier keeps device buffers from here)."""

    def __init__(
        self,
        index: Index,
        plan: LoadPlan,
        decisions: Sequence[Decision],
        sources: Sources,
        *,
        cfg: Config,
        verify: bool = False,
    ) -> None:
        if len(decisions) != len(plan.buffers):
            raise ValueError(f"{len(decisions)} decisions for {len(plan.buffers)} buffers")
        self.index = index
        self.plan = plan
        self.decisions = {d.buffer: d for d in decisions}
        self.sources = sources
        self.cfg = cfg
        self._engine: io_engine.Engine | None = None
        self.files = _Files(index, sources.files, sources.open_partition)
        self.timings = Timings()
        self.verifier = (
            ChunkVerifier(plan.checks, [p.path for p in index.partitions])
            if verify and plan.checks
            else None
        )
        self.buffers: dict[int, torch.Tensor] = {}
        # buffer index -> file offset of its element 0 (mapped buffers; views use file offsets)
        self.mapped: dict[int, int] = {}
        self.views_s = 0.0
        self._ranges = {
            b.index: (b.segments[0][0], b.segments[-1][1]) if b.segments else (0, 0)
            for b in plan.buffers
        }

    # ----------------------------------------------------------------- helpers
    @property
    def engine(self) -> io_engine.Engine:
        """The I/O engine, started on first use (a load served by mappings needs none)."""
        if self._engine is None:
            self._engine = self.sources.engine()
        return self._engine

    @property
    def engine_name(self) -> str:
        return self._engine.name if self._engine is not None else "none"

    def _file_for(self, op: ReadOp) -> io_engine.File:
        source = self.decisions[op.buffer].source
        direct = direct_for(source, self._ranges[op.buffer], op.file_offset)
        return self.files.get(op.partition, direct=direct)

    def _crc_feed(self, buffer: int, dest_offset: int, data: Any) -> None:
        if self.verifier is None:
            return
        t0 = time.perf_counter()

        def crc_of(rel: int, n: int) -> int:
            return io_engine.crc32c(data[rel : rel + n])

        self.verifier.feed(buffer, dest_offset, len(data), crc_of)
        self.timings.add("verify_s", time.perf_counter() - t0)

    # ----------------------------------------------------------------- CPU
    def _map_file(self, b: BufferPlan) -> torch.Tensor:
        """Map the partition range of ``b`` privately; tensors become views of page cache pages
        (copy-on-write: writing to a tensor copies that page, never the file).

        The mapping is not pre-faulted: page tables fill on first touch, many pages per fault
        (the kernel's fault-around), which measured faster than MADV_POPULATE_READ here (2 GB,
        2-core VM: 0.033 s vs 0.236 s median to mapped-and-touched). MAP_POPULATE is worse
        still: on a writable private mapping it write-faults, i.e. copies, every page.
        """
        start = b.segments[0][0] - b.segments[0][0] % PAGE
        end = b.segments[-1][1]
        fd = self.sources.open_partition(
            self.index, b.partition, self.sources.files[b.partition], direct=None
        )
        try:
            mm = mmap.mmap(
                fd,
                end - start,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except ValueError:  # shrunk since the fstat: "mmap length is greater than file size"
            raise TruncatedError(
                "partition shrank after the index was read",
                path=self.index.partitions[b.partition].path,
                offset=start,
            ) from None
        finally:
            os.close(fd)
        self.mapped[b.index] = start
        return torch.frombuffer(mm, dtype=torch.uint8)

    def _map_dram(self, b: BufferPlan) -> torch.Tensor:
        """A copy-on-write mapping of the DRAM-tier block holding ``b``'s partition (a memfd,
        or the partition's own page cache that the tier keeps locked)."""
        block = self.sources.dram[b.partition]
        start = b.segments[0][0] - b.segments[0][0] % PAGE
        end = b.segments[-1][1]
        mm = block.map_private(start, end - start)
        self.mapped[b.index] = start
        return torch.frombuffer(mm, dtype=torch.uint8)

    def _load_cpu(self, bufs: Sequence[BufferPlan]) -> None:
        arrays: dict[int, Any] = {}
        t0 = time.perf_counter()
        for b in bufs:
            source = self.decisions[b.index].source
            if source == "empty":
                self.buffers[b.index] = torch.empty(0, dtype=torch.uint8)
            elif source == "page-cache-map":
                self.buffers[b.index] = self._map_file(b)
            elif source in ("dram-tier", "dram-fill"):
                self.buffers[b.index] = self._map_dram(b)
            else:
                mem = io_engine.AlignedBuffer(b.nbytes)
                self.buffers[b.index] = torch.frombuffer(mem, dtype=torch.uint8)
                arrays[b.index] = memoryview(mem)
        self.timings.add("alloc_s", time.perf_counter() - t0)
        ops = [r for r in self.plan.reads if r.buffer in arrays]
        if not ops:
            return
        reads = [
            (self._file_for(r), r.file_offset, r.nbytes, arrays[r.buffer], r.dest_offset, tag)
            for tag, r in enumerate(ops)
        ]
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
    def _alloc_device(self, nbytes: int, dev: torch.device) -> torch.Tensor:
        """A device buffer; on an allocation failure, once, what the GPU tier keeps idle on that
        device is freed and the allocation retried."""
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=dev)
        except torch.cuda.OutOfMemoryError:
            if self.sources.reclaim is None or not self.sources.reclaim(str(dev)):
                raise
        torch.cuda.empty_cache()
        return torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def _load_gpu(self, device: str, bufs: Sequence[BufferPlan]) -> None:
        dev = torch.device(device)
        t0 = time.perf_counter()
        for b in bufs:
            if self.decisions[b.index].source == "gpu-tier":
                self.buffers[b.index] = self.sources.gpu[b.index]
            else:
                self.buffers[b.index] = self._alloc_device(b.nbytes, dev)
        self.timings.add("alloc_s", time.perf_counter() - t0)
        staged = {
            b.index
            for b in bufs
            if self.decisions[b.index].source not in ("empty", "gpu-tier", "dram-tier", "dram-fill")
        }
        from_dram = [
            b for b in bufs if self.decisions[b.index].source in ("dram-tier", "dram-fill")
        ]
        ops = [r for r in self.plan.reads if r.buffer in staged]
        if not ops and not from_dram:
            return
        with torch.cuda.device(dev):
            streams = [torch.cuda.Stream(device=dev) for _ in range(max(1, self.cfg.copy_streams))]
            try:
                if from_dram:
                    self.copy_from_host(from_dram, streams)
                if ops:
                    assert self.sources.ring is not None, "GPU reads need a staging ring"
                    slot_bytes = max(self.cfg.ring_slot_bytes, max(r.nbytes for r in ops))
                    t0 = time.perf_counter()
                    ring = self.sources.ring(slot_bytes)
                    self.timings.add("ring_s", time.perf_counter() - t0)
                    self.pipeline(ops, ring, streams)
                    if (shortfall := ring.shortfall()) is not None:
                        self.timings.notes.add(shortfall)
            finally:
                # also on failure: no copy may still target a buffer that is about to be freed
                t0 = time.perf_counter()
                for s in streams:
                    s.synchronize()
                self.timings.add("finalize_s", time.perf_counter() - t0)

    def copy_from_host(self, bufs: Sequence[BufferPlan], streams: Sequence[Any]) -> None:
        """Copy each buffer's segments from its partition's DRAM-tier block (whole partition,
        file offset = block offset), one asynchronous copy per chunk, pinning the block piece by
        piece just before the copies reach it."""
        chunk = self.cfg.ring_slot_bytes
        n = 0
        for b in bufs:
            block = self.sources.dram[b.partition]
            if getattr(block, "held", False):  # page cache held for CPU loads: not pinned
                self.timings.notes.add("dram-tier item holds page cache: unpinned GPU copies")
            assert block.buffer is not None
            host = torch.frombuffer(block.buffer, dtype=torch.uint8)
            dst = self.buffers[b.index]
            for start, end, dest in b.segments:
                for lo in range(start, end, chunk):
                    hi = min(end, lo + chunk)
                    block.pin_range(lo, hi)
                    with torch.cuda.stream(streams[n % len(streams)]):
                        d = dest + (lo - start)
                        dst[d : d + (hi - lo)].copy_(host[lo:hi], non_blocking=True)
                    n += 1

    def pipeline(self, ops: Sequence[ReadOp], ring: Any, streams: Sequence[Any]) -> None:
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
                    f = self._file_for(op)
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
            views = self.views()
            self.views_s = time.perf_counter() - t0
            return views
        except BaseException:
            self.buffers.clear()
            raise
        finally:
            self.files.close()

    def views(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` made from the filled buffers (aliases: their target's tensor)."""
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


def fill_blocks(
    index: Index,
    blocks: Mapping[int, Any],
    modes: Mapping[int, str],
    engine: io_engine.Engine,
    files: Sequence[OpenFile],
    *,
    chunk_bytes: int,
    opener: Callable[..., Any] = open_partition,
) -> None:
    """Read whole partitions into host blocks (file offset = block offset), each in its read
    mode (``direct``, ``buffered``, ``mixed``, or ``page-cache-read``)."""
    made: dict[tuple[int, bool], Any] = {}
    reads: list[io_engine.ReadOp] = []
    try:
        for part, block in blocks.items():
            n = index.partitions[part].nbytes
            for lo in range(0, n, chunk_bytes):
                ln = min(chunk_bytes, n - lo)
                direct = direct_for(modes[part], (0, n), lo)
                f = made.get((part, direct))
                if f is None:
                    f = opener(index, part, files[part], direct=direct)
                    made[(part, direct)] = f
                reads.append((f, lo, ln, block.buffer, lo, len(reads)))
        if reads:
            engine.read(reads)
    finally:
        for f in made.values():
            f.close()


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
