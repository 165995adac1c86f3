"""The pinned staging ring for GPU loads: owned by a ``Loader``, reused by every load.

Pinning host memory costs time (measured on an H200 box: 2 GiB cudaHostAlloc 2.1 s; 0.4 s/GB
elsewhere), so a load never pins per call, and a ring does not pin up front: a slot is made (and
pinned) the first time the pipeline needs one more slot than exist, up to the ring's size. A
load that keeps reads and copies overlapped with three slots pins three slots, not the whole ring,
and a long-lived Loader pays once.

Ways to pin a slot (config ``pin_method``): ``pool`` takes a block from the Loader's host pool (a
memfd, registered with cudaHostRegister; the same pool as the DRAM tier, so freed pinned memory
is reused across both); ``alloc`` asks torch's pinned allocator (cudaHostAlloc); ``register``
maps page-aligned anonymous memory and registers it. ``auto`` uses the pool when the ring has
one, else tries ``register`` and falls back to ``alloc``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from typing import Any

import torch

from fastckpt import io_engine


def _cuda_ok(err: Any) -> bool:
    value = getattr(err, "value", err)
    try:
        return int(value) == 0
    except (TypeError, ValueError):
        return str(err).endswith("success")


class Slot:
    """One pinned host buffer: ``tensor`` (torch, uint8, pinned) and ``array`` (a writable
    buffer for the engine), plus the CUDA event of the last copy out of it."""

    __slots__ = ("_registered", "array", "block", "event", "index", "nbytes", "tensor")

    def __init__(self, index: int, nbytes: int, method: str, pool: Any = None) -> None:
        self.index = index
        self.nbytes = nbytes
        self.event: Any = None
        self._registered: Any = None
        self.block: Any = None
        self.tensor: Any = None
        self.array: Any = None
        if method == "pool":
            block = pool.alloc(nbytes)
            try:
                block.pin_range(0, nbytes)
            except BaseException:
                pool.free(block)
                raise
            self.block = block
            self.tensor = torch.frombuffer(block.buffer, dtype=torch.uint8)[:nbytes]
            self.array = memoryview(block.buffer)[:nbytes]
        elif method == "register":
            mem = io_engine.AlignedBuffer(nbytes)
            tensor = torch.frombuffer(mem, dtype=torch.uint8)
            err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
            if not _cuda_ok(err):
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {err}")
            self._registered = mem
            self.tensor = tensor
            self.array = mem
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.array = self.tensor.numpy()

    def __del__(self) -> None:
        if self._registered is not None:
            # at interpreter shutdown CUDA may be gone; the process is going away anyway
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


class StagingRing:
    """A pool of pinned slots. ``acquire()`` hands out a free slot (waiting for its last copy to
    finish), making a new one while fewer than ``target_slots`` exist; ``release()`` returns one.
    Thread-safe; several device pipelines may share it."""

    def __init__(self, slot_bytes: int, slots: int, method: str = "auto", pool: Any = None) -> None:
        if slot_bytes <= 0 or slots <= 0:
            raise ValueError("staging ring needs at least one slot of positive size")
        self.slot_bytes = slot_bytes
        self.target_slots = slots
        self.pool = pool
        self._free: queue.Queue[Slot] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.method = method
        if method == "auto":
            self.method = "pool" if pool is not None else "auto"

    def _new_slot(self) -> Slot:
        if self.method == "auto":
            try:
                slot = Slot(self._made, self.slot_bytes, "register")
                self.method = "register"
            except Exception:
                self.method = "alloc"
                slot = Slot(self._made, self.slot_bytes, "alloc")
        else:
            slot = Slot(self._made, self.slot_bytes, self.method, self.pool)
        return slot

    def _grow(self) -> Slot | None:
        """A new slot when the ring may grow (None when it is full or pinning failed: then the
        pipeline runs with the slots it has)."""
        with self._lock:
            if self._made >= self.target_slots or (self.error is not None and self._made):
                return None
            try:
                slot = self._new_slot()
            except BaseException as exc:  # out of pinnable memory: run with the slots we have
                self.error = exc
                if self._made == 0:
                    raise
                warnings.warn(f"fastckpt: {self.shortfall()}", RuntimeWarning, stacklevel=2)
                return None
            self._made += 1
            return slot

    def shortfall(self) -> str | None:
        """Why the ring has fewer slots than asked for (pinning failed), or None; loads put it
        in ``LoadStats.notes``."""
        if self.error is None:
            return None
        return (
            f"pinned staging ring has {self._made} of {self.target_slots} slots: pinning "
            f"failed ({type(self.error).__name__}: {self.error}); GPU loads run with fewer slots"
        )

    @property
    def slots(self) -> int:
        return self._made

    def acquire(self) -> Slot:
        try:
            return self._ready(self._free.get_nowait())
        except queue.Empty:
            pass
        slot = self._grow()
        if slot is not None:
            return slot
        return self._ready(self._free.get())

    def try_acquire(self) -> Slot | None:
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return self._grow()
        return self._ready(slot)

    @staticmethod
    def _ready(slot: Slot) -> Slot:
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        return slot

    def release(self, slot: Slot) -> None:
        self._free.put(slot)

    def close(self) -> None:
        """Give pool-backed slots back to the pool (pinned memory stays pinned for reuse)."""
        while True:
            try:
                slot = self._free.get_nowait()
            except queue.Empty:
                break
            if slot.block is not None and self.pool is not None:
                slot.tensor = None
                slot.array = None
                self.pool.free(slot.block)
