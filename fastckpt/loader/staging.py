"""The pinned staging ring for GPU loads: made once per process, reused by every load.

Pinning host memory costs about a second per GB, so a load never pins per call. The ring starts
with one slot pinned and pins the rest on a background thread while the first load already runs,
so a fresh process pays for one slot before its first read instead of for the whole ring.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch


class Slot:
    """One pinned host buffer: ``tensor`` (torch, uint8) and ``array`` (numpy view, for the
    engine), plus the CUDA event of the last copy out of it."""

    __slots__ = ("array", "event", "index", "nbytes", "tensor")

    def __init__(self, index: int, nbytes: int) -> None:
        self.index = index
        self.nbytes = nbytes
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.array = self.tensor.numpy()
        self.event: Any = None


class StagingRing:
    """A pool of pinned slots. ``acquire()`` hands out a free slot (waiting for its last copy to
    finish), ``release()`` returns one. Thread-safe; several device pipelines may share it."""

    def __init__(self, slot_bytes: int, slots: int) -> None:
        if slot_bytes <= 0 or slots <= 0:
            raise ValueError("staging ring needs at least one slot of positive size")
        self.slot_bytes = slot_bytes
        self.target_slots = slots
        self._free: queue.Queue[Slot] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._free.put(self._new_slot())
        self._filler: threading.Thread | None = None
        if slots > 1:
            self._filler = threading.Thread(target=self._fill, name="fastckpt-pin", daemon=True)
            self._filler.start()

    def _new_slot(self) -> Slot:
        with self._lock:
            index = self._made
            self._made += 1
        return Slot(index, self.slot_bytes)

    def _fill(self) -> None:
        try:
            while self._made < self.target_slots:
                self._free.put(self._new_slot())
        except BaseException as exc:  # pinning failed (out of pinnable memory): run with fewer
            self._error = exc

    @property
    def slots(self) -> int:
        return self._made

    def acquire(self) -> Slot:
        slot = self._free.get()
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        return slot

    def try_acquire(self) -> Slot | None:
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return None
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        return slot

    def release(self, slot: Slot) -> None:
        self._free.put(slot)


_ring: StagingRing | None = None
_ring_lock = threading.Lock()


def get_ring(slot_bytes: int, ring_bytes: int) -> StagingRing:
    """The process-wide ring, created on first use (re-created only if a larger slot is needed)."""
    global _ring
    with _ring_lock:
        if _ring is None or _ring.slot_bytes < slot_bytes:
            slots = max(2, ring_bytes // slot_bytes)
            _ring = StagingRing(slot_bytes, slots)
        return _ring
