"""The device stage: host bytes to one device's buffers, through the pinned staging ring.

A ``DeviceStage`` belongs to a Loader and a device. It allocates device buffers, and ``run`` moves
a list of operations in one call into the C++ copy pipeline (``io_engine.run_copy_pipeline``, the
GIL released, no Python per chunk): ``read`` (the I/O engine reads a file range into a free ring
slot, the slot is copied to the device on the next of several streams, and the slot is reused
once that copy's event completed) and ``host`` (memory that is already pinned, a DRAM-tier block,
is copied straight to the device). No pageable memory is ever copied to a device.

Ordering with the caller's work: before any copy writes, every copy stream waits on the caller's
current stream (a block the caching allocator just recycled may still be read by kernels queued
there); ``run`` returns once every copy completed, and the current stream is made to wait on the
copy streams too, so the tensors are ready on it.

The stage is a seam: ``CudaStage`` drives a GPU through the CUDA driver; ``FakeStage`` is a
device made of host memory and a ``FakeCopyBackend`` (copies on worker threads, with a delay),
on which the whole device path runs on CPU in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt import io_engine
from fastckpt.loader.plan import ReadOp
from fastckpt.loader.staging import StagingRing

HOST_OP_MAX_BYTES = 128 << 20  # host copies are merged up to this size (64-128 MiB chunks)


@dataclass(frozen=True)
class StageOp:
    """One transfer: ``read`` the plan's ``read`` range of ``file`` through a ring slot, or copy
    it from the pinned ``block`` (``host``); either lands at ``read.dest_offset`` of ``dst``.
    ``gate`` (reads only) holds the read until its bytes have arrived (a streamed source)."""

    kind: str
    read: ReadOp
    dst: torch.Tensor
    file: io_engine.File | None = None
    block: Any = None
    gate: Any = None


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
    """What every stage shares: building pipeline ops, running them, growing the ring."""

    device: str

    def __init__(self, device: str, backend: Any, ring: StagingRing) -> None:
        self.device = device
        self.backend = backend
        self.ring = ring

    # -- buffers ---------------------------------------------------------------------------
    def alloc(self, nbytes: int, reclaim: Callable[[str], int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read_op(
        self, read: ReadOp, file: io_engine.File, dst: torch.Tensor, gate: Any = None
    ) -> StageOp:
        return StageOp("read", read, dst, file=file, gate=gate)

    def host_op(self, read: ReadOp, block: Any, dst: torch.Tensor) -> StageOp:
        return StageOp("host", read, dst, block=block)

    # -- ordering with the caller's stream (no-ops on a fake device) -------------------------
    def _before(self) -> Any:
        return None

    def _after(self, token: Any) -> None:
        pass

    # -- moving bytes ----------------------------------------------------------------------
    def run(self, engine: io_engine.Engine, ops: Sequence[StageOp], *, crc: bool) -> StageResult:
        result = StageResult()
        if not ops:
            return result
        result.ring_s = self.ring.ready()
        staged = sum(op.read.nbytes for op in ops if op.kind == "read")
        if staged > self.ring.total * self.ring.slot_bytes * 2:
            self.ring.grow(self.ring.max_slots)  # a large load: pin more meanwhile
        raw, index_of = _pipeline_ops(ops, crc)
        token = self._before()
        try:
            res = io_engine.run_copy_pipeline(engine, raw, self.ring.slots, self.backend, crc=crc)
        finally:
            self._after(token)
        if res.slot_starved:
            self.ring.grow(self.ring.total + max(2, self.ring.total))
        if crc:
            result.crcs = [res.crcs[index_of[i]] for i in range(len(ops))]
        result.copies = res.copies
        result.max_in_flight = res.max_copies_in_flight
        result.read_wait_s = res.read_wait_s + res.gate_wait_s
        result.copy_wait_s = res.copy_wait_s + res.slot_wait_s + res.drain_s
        if (shortfall := self.ring.shortfall()) is not None:
            result.notes.add(shortfall)
        return result


def _pipeline_ops(ops: Sequence[StageOp], crc: bool) -> tuple[list[Any], list[int]]:
    """The C++ pipeline's ops for ``ops``, and for each of ``ops`` the index of the pipeline op
    holding it. Host copies of adjacent ranges are merged up to ``HOST_OP_MAX_BYTES`` (not when
    CRCs are asked for: each op needs its own)."""
    raw: list[Any] = []
    index_of: list[int] = []
    last: list[int] | None = None  # [src, nbytes, dst] of the host op being merged
    for op in ops:
        r = op.read
        dst = int(op.dst.data_ptr()) + r.dest_offset
        if op.kind == "host":
            src = int(op.block.address) + r.file_offset
            if (
                not crc
                and last is not None
                and last[0] + last[1] == src
                and last[2] + last[1] == dst
                and last[1] + r.nbytes <= HOST_OP_MAX_BYTES
            ):
                last[1] += r.nbytes
                raw[-1] = ("host", last[0], last[1], last[2])
            else:
                last = [src, r.nbytes, dst]
                raw.append(("host", src, r.nbytes, dst))
        else:
            last = None
            raw.append(("read", op.file, r.file_offset, r.nbytes, dst, op.gate))
        index_of.append(len(raw) - 1)
    return raw, index_of


class CudaStage(DeviceStage):
    """A GPU (``cuda:N``): copies on ``streams`` torch streams through the CUDA driver."""

    def __init__(self, device: str, streams: int, ring_for: Callable[[Any], StagingRing]) -> None:
        self._dev = torch.device(device)
        self.streams = [torch.cuda.Stream(device=self._dev) for _ in range(max(1, streams))]
        backend = io_engine.cuda_copy_backend(
            int(self._dev.index or 0), [s.cuda_stream for s in self.streams]
        )
        super().__init__(device, backend, ring_for(backend))

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

    def _before(self) -> Any:
        current = torch.cuda.current_stream(self._dev)
        for s in self.streams:
            s.wait_stream(current)
        return current

    def _after(self, token: Any) -> None:
        for s in self.streams:
            token.wait_stream(s)


class FakeStage(DeviceStage):
    """A device made of host memory: buffers are CPU tensors, copies run on a
    ``FakeCopyBackend``'s worker threads (with its delay), which checks that no staging slot is
    overwritten before its copy ran. Everything else is the real pipeline."""

    def alloc(self, nbytes: int, reclaim: Callable[[str], int] | None = None) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


class FakeDevice:
    """A ``Loader(device_stage=...)`` factory: every device is a ``FakeStage`` sharing one fake
    backend and one ring of ``slots`` slots of ``slot_bytes`` (``min_slots`` made first, the rest
    grown on demand). A forked child gets a backend and ring of its own (the parent's worker
    threads do not exist there), as a real process gets a fresh CUDA stage."""

    def __init__(
        self,
        *,
        streams: int = 4,
        delay_s: float = 0.0,
        slot_bytes: int = 1 << 20,
        slots: int = 8,
        min_slots: int = 2,
    ) -> None:
        self._settings = (streams, delay_s, slot_bytes, slots, min_slots)
        self._pid = -1
        self._make()

    def _make(self) -> None:
        import os

        streams, delay_s, slot_bytes, slots, min_slots = self._settings
        self._pid = os.getpid()
        self.backend = io_engine.FakeCopyBackend(streams, delay_s)
        self.ring = StagingRing(
            self.backend, slot_bytes, slots, method="register", min_slots=min_slots
        )

    def __call__(self, device: str, loader: Any) -> FakeStage:
        import os

        if os.getpid() != self._pid:
            self._make()
        return FakeStage(device, self.backend, self.ring)


def fake_stage_factory(**settings: Any) -> FakeDevice:
    """``FakeDevice(**settings)``: see there."""
    return FakeDevice(**settings)
