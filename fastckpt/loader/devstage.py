"""The device stage: host bytes to one device's buffers, through the pinned staging ring.

A ``DeviceStage`` belongs to a Loader and a device. It allocates device buffers, and ``run`` moves
a list of operations: ``read`` (the I/O engine reads a file range into a free ring slot, then the
slot is copied to the device) and ``host`` (a range of memory that is already pinned, a DRAM-tier
block, is copied straight to the device). No pageable memory is ever copied to a device.

Ordering with the caller's work: before any copy writes, every copy stream waits on the caller's
current stream (a block the caching allocator just recycled may still be read by queued kernels);
before ``run`` returns, the current stream waits on every copy stream, so tensors are ready to use
on it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt import io_engine
from fastckpt.loader.plan import ReadOp


@dataclass(frozen=True)
class StageOp:
    """One transfer: ``read`` the plan's ``read`` range of ``file`` through a ring slot, or copy
    it from the pinned ``block`` (``host``); either lands at ``read.dest_offset`` of ``dst``."""

    kind: str
    read: ReadOp
    dst: torch.Tensor
    file: io_engine.File | None = None
    block: Any = None


@dataclass
class StageResult:
    crcs: list[int] = field(default_factory=list)
    copies: int = 0
    max_in_flight: int = 0
    read_wait_s: float = 0.0
    copy_wait_s: float = 0.0
    ring_s: float = 0.0
    notes: set[str] = field(default_factory=set)


class DeviceStage:
    """Moves bytes to ``device`` (a canonical ``cuda:N``) with ``ring`` (a ``StagingRing``) and
    ``streams`` copy streams."""

    def __init__(self, device: str, ring: Callable[[int], Any], streams: int) -> None:
        self.device = device
        self._dev = torch.device(device)
        self._ring = ring
        with torch.cuda.device(self._dev):
            self.streams = [torch.cuda.Stream(device=self._dev) for _ in range(max(1, streams))]

    # -- buffers ---------------------------------------------------------------------------
    def alloc(self, nbytes: int, reclaim: Callable[[str], int] | None = None) -> torch.Tensor:
        """A device buffer; on an allocation failure, once, what ``reclaim`` frees on this
        device (the GPU tier's idle buffers) is freed and the allocation retried."""
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self._dev)
        except torch.cuda.OutOfMemoryError:
            if reclaim is None or not reclaim(self.device):
                raise
        torch.cuda.empty_cache()
        return torch.empty(nbytes, dtype=torch.uint8, device=self._dev)

    def read_op(self, read: ReadOp, file: io_engine.File, dst: torch.Tensor) -> StageOp:
        return StageOp("read", read, dst, file=file)

    def host_op(self, read: ReadOp, block: Any, dst: torch.Tensor) -> StageOp:
        return StageOp("host", read, dst, block=block)

    # -- moving bytes ----------------------------------------------------------------------
    def run(self, engine: io_engine.Engine, ops: Sequence[StageOp], *, crc: bool) -> StageResult:
        result = StageResult()
        if not ops:
            return result
        current = torch.cuda.current_stream(self._dev)
        for s in self.streams:
            s.wait_stream(current)
        try:
            host = [op for op in ops if op.kind == "host"]
            reads = [op for op in ops if op.kind == "read"]
            crcs: dict[int, int] = {}
            for i, op in enumerate(host):
                r = op.read
                src = torch.frombuffer(op.block.buffer, dtype=torch.uint8)
                with torch.cuda.stream(self.streams[i % len(self.streams)]):
                    op.dst[r.dest_offset : r.dest_offset + r.nbytes].copy_(
                        src[r.file_offset : r.file_offset + r.nbytes], non_blocking=True
                    )
                result.copies += 1
            if reads:
                slot_bytes = max(r.read.nbytes for r in reads)
                t0 = time.perf_counter()
                ring = self._ring(slot_bytes)
                result.ring_s += time.perf_counter() - t0
                self._pipeline(engine, reads, ring, crc, crcs, result)
                if (shortfall := ring.shortfall()) is not None:
                    result.notes.add(shortfall)
            if crc:
                ids = {id(op): i for i, op in enumerate(reads)}
                result.crcs = [crcs[ids[id(op)]] if op.kind == "read" else 0 for op in ops]
        finally:
            # also on failure: no copy may still target a buffer that is about to be freed
            t0 = time.perf_counter()
            for s in self.streams:
                current.wait_stream(s)
                s.synchronize()
            result.copy_wait_s += time.perf_counter() - t0
        return result

    def _pipeline(
        self,
        engine: io_engine.Engine,
        ops: Sequence[StageOp],
        ring: Any,
        crc: bool,
        crcs: dict[int, int],
        result: StageResult,
    ) -> None:
        """Reads into ring slots -> copies; at most ``ring.slots`` reads in flight."""
        pending: deque[tuple[Any, int, Any]] = deque()  # (batch, op index, slot)
        next_op = 0
        held: Any = None
        streams = self.streams
        try:
            while next_op < len(ops) or pending:
                while next_op < len(ops):
                    w0 = time.perf_counter()
                    held = ring.try_acquire() if pending else ring.acquire()
                    result.copy_wait_s += time.perf_counter() - w0
                    if held is None:
                        break
                    op = ops[next_op]
                    r = op.read
                    assert op.file is not None
                    batch = engine.submit([(op.file, r.file_offset, r.nbytes, held.array, 0, 0)])
                    pending.append((batch, next_op, held))
                    held = None
                    next_op += 1
                batch, i, held = pending.popleft()
                w0 = time.perf_counter()
                batch.wait_all()
                result.read_wait_s += time.perf_counter() - w0
                op = ops[i]
                r = op.read
                if crc:
                    crcs[i] = io_engine.crc32c(memoryview(held.array)[: r.nbytes])
                stream = streams[result.copies % len(streams)]
                result.copies += 1
                with torch.cuda.stream(stream):
                    op.dst[r.dest_offset : r.dest_offset + r.nbytes].copy_(
                        held.tensor[: r.nbytes], non_blocking=True
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
