"""The pinned staging ring for GPU loads: made once per process, reused by every load.

Pinning host memory costs time (measured on an H200 box: 2 GiB cudaHostAlloc 2.1 s), so a load
never pins per call. The ring starts with one slot pinned and pins the rest on a background
thread while the first load already runs, so a fresh process pays for one slot before its first
read instead of for the whole ring.

Two ways to pin a slot (config ``pin_method``): ``alloc`` asks torch's pinned allocator
(cudaHostAlloc); ``register`` maps page-aligned anonymous memory (huge pages where the kernel
gives them) and registers it with cudaHostRegister. ``auto`` tries ``register`` and falls back to
``alloc``. Which is cheaper depends on the kernel and driver; the benchmark measures both.
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

    __slots__ = ("_registered", "array", "event", "index", "nbytes", "tensor")

    def __init__(self, index: int, nbytes: int, method: str) -> None:
        self.index = index
        self.nbytes = nbytes
        self.event: Any = None
        self._registered: Any = None
        if method == "register":
            mem = io_engine.AlignedBuffer(nbytes)
            tensor = torch.frombuffer(mem, dtype=torch.uint8)
            err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
            if not _cuda_ok(err):
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {err}")
            self._registered = mem
            self.tensor = tensor
            self.array: Any = mem
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
    finish), ``release()`` returns one. Thread-safe; several device pipelines may share it."""

    def __init__(self, slot_bytes: int, slots: int, method: str = "auto") -> None:
        if slot_bytes <= 0 or slots <= 0:
            raise ValueError("staging ring needs at least one slot of positive size")
        self.slot_bytes = slot_bytes
        self.target_slots = slots
        self._free: queue.Queue[Slot] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.method = method
        if method == "auto":
            try:
                first = self._new_slot("register")
                self.method = "register"
            except Exception:
                self.method = "alloc"
                first = self._new_slot("alloc")
        else:
            first = self._new_slot(method)
        self._free.put(first)
        self._filler: threading.Thread | None = None
        if slots > 1:
            self._filler = threading.Thread(target=self._fill, name="fastckpt-pin", daemon=True)
            self._filler.start()

    def _new_slot(self, method: str) -> Slot:
        with self._lock:
            index = self._made
        slot = Slot(index, self.slot_bytes, method)
        with self._lock:
            self._made += 1
        return slot

    def _fill(self) -> None:
        try:
            while self._made < self.target_slots:
                self._free.put(self._new_slot(self.method))
        except BaseException as exc:  # out of pinnable memory: run with the slots we have
            self.error = exc
            warnings.warn(f"fastckpt: {self.shortfall()}", RuntimeWarning, stacklevel=1)

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
        return self._ready(self._free.get())

    def try_acquire(self) -> Slot | None:
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return None
        return self._ready(slot)

    @staticmethod
    def _ready(slot: Slot) -> Slot:
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        return slot

    def release(self, slot: Slot) -> None:
        self._free.put(slot)


_ring: StagingRing | None = None
_ring_lock = threading.Lock()


def get_ring(slot_bytes: int, ring_bytes: int, method: str = "auto") -> StagingRing:
    """The process-wide ring, created on first use (re-created only if a larger slot is needed)."""
    global _ring
    with _ring_lock:
        if _ring is None or _ring.slot_bytes < slot_bytes:
            slots = max(2, ring_bytes // slot_bytes)
            _ring = StagingRing(slot_bytes, slots, method)
        return _ring


def current_ring() -> StagingRing | None:
    return _ring
