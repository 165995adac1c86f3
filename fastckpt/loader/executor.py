"""Carry out a ``LoadDecision`` for a ``LoadPlan``: allocate buffers, move bytes, make views.

The executor decides nothing: for each buffer the policy (``fastckpt.loader.policy``) names a
``Source``, and the objects behind the names are handed in (``fastckpt.loader.sources``). This is
the one place bytes leave a checkpoint, for every entry point (``load``, ``open``,
``iter_tensors``, the DRAM-tier fill, the daemon's copies, the vLLM weight source), so
FORMAT.md's rules hold here once: reads go only through validated descriptors, every view is
checked (bool bytes are 0 or 1), and ``verify`` checks every chunk's CRC32C on the bytes the
caller gets.

- CPU buffers are private mappings (copy-on-write views of the page cache, of a DRAM-tier block
  or of the daemon's sealed memfd: no copy) or are read straight into their final memory.
- Device buffers are revived from the GPU tier, or filled by the device stage
  (``fastckpt.loader.devstage``): reads into the pinned staging ring and copies from it, or copies
  straight from memory the DRAM tier pinned, several copies in flight; no pageable copy.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.errors import CorruptDataError, TruncatedError
from fastckpt.format import dtypes
from fastckpt.format.index import Index
from fastckpt.loader.checks import ChunkVerifier
from fastckpt.loader.hugepages import HugePages
from fastckpt.loader.plan import BufferPlan, LoadPlan, ReadOp, ViewPlan, contiguous_strides
from fastckpt.loader.policy import Decision, LoadDecision, Source
from fastckpt.loader.sources import EngineFiles, Sources

PAGE = 4096


@dataclass
class Timings:
    alloc_s: float = 0.0
    read_wait_s: float = 0.0
    copy_wait_s: float = 0.0
    ring_s: float = 0.0
    finalize_s: float = 0.0
    verify_s: float = 0.0
    copies: int = 0
    max_copies_in_flight: int = 0
    notes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)

    def absorb(self, result: Any) -> None:
        """Add a device stage's result (``devstage.StageResult``)."""
        with self.lock:
            self.read_wait_s += result.read_wait_s
            self.copy_wait_s += result.copy_wait_s
            self.ring_s += result.ring_s
            self.copies += result.copies
            self.max_copies_in_flight = max(self.max_copies_in_flight, result.max_in_flight)
            self.notes.update(result.notes)


class Executor:
    """Runs one plan: ``run()`` returns ``{name: tensor}``; ``buffers`` then holds each buffer's
    tensor (the GPU tier keeps device buffers from here)."""

    def __init__(
        self,
        index: Index,
        plan: LoadPlan,
        decision: LoadDecision | Sequence[Decision],
        sources: Sources,
        *,
        cfg: Config,
        verify: bool = False,
    ) -> None:
        decisions = tuple(decision)
        if len(decisions) != len(plan.buffers):
            raise ValueError(f"{len(decisions)} decisions for {len(plan.buffers)} buffers")
        self.index = index
        self.plan = plan
        self.decisions = {d.buffer: d for d in decisions}
        self.sources = sources
        self.cfg = cfg
        self.huge_pages = HugePages(cfg.cpu_huge_pages)
        self._engine: io_engine.Engine | None = None
        self.files = EngineFiles(index, sources)
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
        for i, mem in sources.into.items():
            _check_into(plan.buffers[i], mem)

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

    def source_of(self, buffer: int) -> Source:
        return self.decisions[buffer].source

    def file_for(self, op: ReadOp) -> io_engine.File:
        """The engine file a read of ``op`` goes through, per its buffer's source."""
        source = self.source_of(op.buffer)
        direct = source.direct_at(self._ranges[op.buffer], op.file_offset)
        return self.files.get(source, op.partition, direct)

    def crc_feed(self, buffer: int, dest_offset: int, data: Any) -> None:
        if self.verifier is None:
            return
        t0 = time.perf_counter()

        def crc_of(rel: int, n: int) -> int:
            return io_engine.crc32c(data[rel : rel + n])

        self.verifier.feed(buffer, dest_offset, len(data), crc_of)
        self.timings.add("verify_s", time.perf_counter() - t0)

    # ----------------------------------------------------------------- CPU
    def _map(self, b: BufferPlan, source: Source) -> torch.Tensor:
        """A private (copy-on-write) mapping of ``b``'s partition range from its source: the
        page cache of the validated file, a DRAM-tier block, or the daemon's sealed memfd.

        The mapping is not pre-faulted: page tables fill on first touch, many pages per fault
        (the kernel's fault-around), which measured faster than MADV_POPULATE_READ here (2 GB,
        2-core VM: 0.033 s vs 0.236 s median to mapped-and-touched). MAP_POPULATE is worse
        still: on a writable private mapping it write-faults, i.e. copies, every page.
        """
        start = b.segments[0][0] - b.segments[0][0] % PAGE
        end = b.segments[-1][1]
        if source.streams:
            self._wait_stream(b.partition, start, end)
        if source is Source.DRAM_TIER:
            mm = self.sources.dram[b.partition].map_private(start, end - start)
        else:
            src = self.sources.descriptor(source, b.partition)
            fd = self.sources.open_partition(self.index, b.partition, src, direct=None)
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
        tensor = torch.frombuffer(mm, dtype=torch.uint8)
        if self.verifier is not None:  # sealed (daemon) or private bytes: check what is mapped
            self.crc_feed(b.index, 0, memoryview(mm))
        return tensor

    def _alloc_cpu(self, b: BufferPlan) -> tuple[torch.Tensor, Any]:
        mine = self.sources.into.get(b.index)
        if mine is not None:
            return mine, memoryview(mine.numpy())
        dest = self.sources.cpu_dest.get(b.index)
        if dest is not None:
            return torch.frombuffer(dest, dtype=torch.uint8)[: b.nbytes], dest
        mem = io_engine.AlignedBuffer(b.nbytes, huge_pages=self.huge_pages.advise(b.nbytes))
        return torch.frombuffer(mem, dtype=torch.uint8), mem

    def _load_cpu(self, bufs: Sequence[BufferPlan]) -> None:
        arrays: dict[int, Any] = {}
        t0 = time.perf_counter()
        for b in bufs:
            source = self.source_of(b.index)
            if source is Source.EMPTY:
                self.buffers[b.index] = torch.empty(0, dtype=torch.uint8)
            elif source.maps_on_cpu and b.mappable and b.index not in self.sources.cpu_dest:
                self.buffers[b.index] = self._map(b, source)
            else:
                tensor, mem = self._alloc_cpu(b)
                self.buffers[b.index] = tensor
                arrays[b.index] = memoryview(mem)
        self.timings.add("alloc_s", time.perf_counter() - t0)
        ops = [r for r in self.plan.reads if r.buffer in arrays]
        if not ops:
            return
        reads = [
            (self.file_for(r), r.file_offset, r.nbytes, arrays[r.buffer], r.dest_offset, tag)
            for tag, r in enumerate(ops)
        ]
        t0 = time.perf_counter()
        streaming = [self.source_of(r.buffer).streams for r in ops]
        if any(streaming):
            self._want(ops)
        # Reads whose bytes are still arriving are submitted as their ranges land: everything
        # before the first such read goes at once, then each waits on its gate.
        batches = []
        try:
            at = 0
            while at < len(reads):
                end = at + 1
                while end < len(reads) and not (streaming[end] and not self._arrived(ops[end])):
                    end += 1
                if streaming[at]:
                    r = ops[at]
                    w0 = time.perf_counter()
                    self._wait_stream(r.partition, r.file_offset, r.file_offset + r.nbytes)
                    self.timings.add("read_wait_s", time.perf_counter() - w0)
                batches.append(self.engine.submit(reads[at:end]))
                at = end
            for batch in batches:
                self._finish_cpu_batch(batch, ops, arrays)
        finally:
            for batch in batches:
                batch.cancel()  # a no-op for a batch that completed
        if self.verifier is None:
            self.timings.add("read_wait_s", time.perf_counter() - t0)

    def _finish_cpu_batch(self, batch: Any, ops: Sequence[ReadOp], arrays: dict[int, Any]) -> None:
        if self.verifier is None:
            batch.wait_all()
            return
        while True:
            w0 = time.perf_counter()
            done = batch.wait(1)
            self.timings.add("read_wait_s", time.perf_counter() - w0)
            if not done:
                return
            for tag in done:
                r = ops[tag]
                view = arrays[r.buffer][r.dest_offset : r.dest_offset + r.nbytes]
                self.crc_feed(r.buffer, r.dest_offset, view)

    # ----------------------------------------------------------------- streams
    def _want(self, ops: Sequence[ReadOp]) -> None:
        """Ask the stream for the ranges of ``ops`` first (one span per partition, in order)."""
        stream = self.sources.stream
        if stream is None:
            return
        spans: dict[int, list[int]] = {}
        for r in ops:
            if not self.source_of(r.buffer).streams:
                continue
            span = spans.setdefault(r.partition, [r.file_offset, r.file_offset + r.nbytes])
            span[0] = min(span[0], r.file_offset)
            span[1] = max(span[1], r.file_offset + r.nbytes)
        for part, (lo, hi) in spans.items():
            stream.want(part, lo, hi)

    def _arrived(self, r: ReadOp) -> bool:
        stream = self.sources.stream
        gate = stream.gate(r.partition) if stream is not None else None
        return gate is None or gate.ready(r.file_offset, r.file_offset + r.nbytes)

    def _wait_stream(self, partition: int, lo: int, hi: int) -> None:
        stream = self.sources.stream
        if stream is not None:
            stream.want(partition, lo, hi)
            stream.wait(partition, lo, hi)

    def _stream_error(self, exc: BaseException) -> BaseException:
        """The download's own error for a read that failed on its gate (typed: a checksum, an
        object replaced, refused credentials), else ``exc``."""
        stream = self.sources.stream
        err = stream.error() if stream is not None else None
        return err if err is not None else exc

    # ----------------------------------------------------------------- devices
    def _load_device(self, device: str, bufs: Sequence[BufferPlan]) -> None:
        assert self.sources.stage is not None, "device buffers need a device stage"
        t0 = time.perf_counter()
        stage = self.sources.stage(device)
        self.timings.add("ring_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        if any(b.index in self.sources.into for b in bufs):
            here = stage.alloc(0).device
            for b in bufs:
                mem = self.sources.into.get(b.index)
                if mem is not None and mem.device != here:
                    raise ValueError(
                        f"buffer {b.index} is to be filled on {here}; the memory given is on "
                        f"{mem.device}"
                    )
        for b in bufs:
            if self.source_of(b.index) is Source.GPU_TIER:
                self.buffers[b.index] = self.sources.gpu[b.index]
            elif b.index in self.sources.into:
                self.buffers[b.index] = self.sources.into[b.index]
            else:
                self.buffers[b.index] = stage.alloc(b.nbytes, self.sources.reclaim)
        self.timings.add("alloc_s", time.perf_counter() - t0)
        moving = {
            b.index for b in bufs if self.source_of(b.index) not in (Source.EMPTY, Source.GPU_TIER)
        }
        if not moving:
            return
        ops: list[Any] = []
        staged_dram = False
        for r in _split(self.plan.reads, moving, stage.ring.slot_bytes):
            dst = self.buffers[r.buffer]
            source = self.source_of(r.buffer)
            block = self.sources.dram.get(r.partition) if source is Source.DRAM_TIER else None
            if block is not None and block.pinned_range(r.file_offset, r.file_offset + r.nbytes):
                ops.append(stage.host_op(r, block, dst))
            else:
                staged_dram = staged_dram or block is not None
                gate = None
                if source.streams and self.sources.stream is not None:
                    gate = self.sources.stream.gate(r.partition)
                ops.append(stage.read_op(r, self.file_for(r), dst, gate=gate))
        if staged_dram:
            self.timings.notes.add(
                "dram-tier item not pinned (yet): its bytes went through the pinned staging ring"
            )
        self._want([op.read for op in ops if op.gate is not None])
        try:
            result = stage.run(self.engine, ops, crc=self.verifier is not None)
        except OSError as exc:
            err = self._stream_error(exc)
            if err is exc:
                raise
            raise err from exc
        self.timings.absorb(result)
        if self.verifier is not None:
            t0 = time.perf_counter()
            for op, crc in zip(ops, result.crcs, strict=True):
                r = op.read
                self.verifier.feed(r.buffer, r.dest_offset, r.nbytes, _whole(crc, r.nbytes))
            self.timings.add("verify_s", time.perf_counter() - t0)

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
                    jobs.append((self._load_device, (device, bufs)))
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
        """``{name: tensor}`` made from the filled buffers (aliases: their target's tensor).

        Each tensor is one ``as_strided`` view of its buffer seen as its dtype (one typed view
        per buffer and dtype), which keeps making views cheap for checkpoints of many tensors
        (a GPU-tier hit is little else)."""
        out: dict[str, torch.Tensor] = {}
        typed: dict[tuple[int, str], torch.Tensor] = {}
        for v in self.plan.views:
            out[v.name] = self._view(v, typed)
        for alias, target in self.plan.aliases.items():
            out[alias] = out[target]
        return out

    def _view(self, v: ViewPlan, typed: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        buf = self.buffers[v.buffer]
        dt = _torch_dtype(v.dtype, v.name)
        if v.nbytes == 0:
            return torch.empty(v.shape, dtype=dt, device=buf.device)
        rel = v.file_offset - self.mapped[v.buffer] if v.buffer in self.mapped else v.rel_offset
        itemsize = dtypes.get(v.dtype).itemsize
        strides = v.strides if v.strides is not None else contiguous_strides(v.shape)
        # bytes from the view's first element to past its last (a strided view spans gaps)
        span = itemsize * (1 + sum((n - 1) * st for n, st in zip(v.shape, strides, strict=True)))
        if v.dtype == "bool" and bool((buf[rel : rel + span] > 1).any()):  # FORMAT.md 3
            raise CorruptDataError(
                "bool tensor holds bytes other than 0 and 1",
                path=self.index.partitions[v.partition].path,
                tensor=v.name,
            )
        if rel % itemsize:
            # Not aligned for its dtype: cannot be a view; give it memory of its own.
            own = torch.empty(v.shape, dtype=dt, device=buf.device)
            byte_view = buf.as_strided(
                (*v.shape, itemsize),
                (*(st * itemsize for st in strides), 1),
                buf.storage_offset() + rel,
            )
            own.reshape(-1).view(torch.uint8).view(*v.shape, itemsize).copy_(byte_view)
            return own
        whole = typed.get((v.buffer, v.dtype))
        if whole is None:
            n = buf.numel() - buf.numel() % itemsize
            whole = typed[(v.buffer, v.dtype)] = buf[:n].view(dt)
        return whole.as_strided(v.shape, strides, whole.storage_offset() + rel // itemsize)


_DTYPES: dict[str, torch.dtype] = {}


def _torch_dtype(name: str, tensor: str) -> torch.dtype:
    dt = _DTYPES.get(name)
    if dt is None:
        dt = _DTYPES[name] = dtypes.torch_dtype(name, tensor=tensor)
    return dt


def _check_into(b: BufferPlan, mem: Any) -> None:
    """A caller's memory for buffer ``b`` must be exactly a buffer: reads and copies write to its
    address, so anything else would write out of bounds."""
    if not isinstance(mem, torch.Tensor):
        raise TypeError(f"memory for buffer {b.index} must be a torch.Tensor, not {type(mem)}")
    if mem.dtype != torch.uint8 or not mem.is_contiguous() or mem.numel() != b.nbytes:
        raise ValueError(
            f"memory for buffer {b.index} must be a contiguous uint8 tensor of {b.nbytes} bytes; "
            f"got {mem.dtype}, shape {list(mem.shape)}, contiguous={mem.is_contiguous()}"
        )
    if b.device == "cpu" and mem.device.type != "cpu":  # devices: checked against their stage
        raise ValueError(f"buffer {b.index} is on {b.device}; the memory given is on {mem.device}")


def _whole(crc: int, nbytes: int) -> Any:
    """A ``crc_of`` for the verifier when only the CRC of a whole piece is known (pieces are
    planned on checksum chunk boundaries, so the verifier asks for whole pieces)."""

    def crc_of(rel: int, n: int) -> int:
        if rel != 0 or n != nbytes:
            raise RuntimeError(
                "internal error: a verified device read does not lie on checksum chunk "
                f"boundaries ({rel}+{n} of {nbytes})"
            )
        return crc

    return crc_of


def _split(reads: Sequence[ReadOp], buffers: set[int], limit: int) -> list[ReadOp]:
    """The reads of ``buffers``, each cut into pieces of at most ``limit`` bytes (a staging
    slot). Pieces stay inside their read, so a verified read (one checksum chunk, or a part of
    one) still lies inside one chunk."""
    out: list[ReadOp] = []
    for r in reads:
        if r.buffer not in buffers:
            continue
        if r.nbytes <= limit:
            out.append(r)
            continue
        for k in range(0, r.nbytes, limit):
            n = min(limit, r.nbytes - k)
            out.append(ReadOp(r.buffer, r.partition, r.file_offset + k, n, r.dest_offset + k))
    return out


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
