"""A pinning failure while the staging ring fills is visible: a warning and a shortfall note
(which the executor copies into ``LoadStats.notes``). Runs without CUDA: slots are stand-ins."""

from __future__ import annotations

from typing import Any

import pytest

from fastckpt.loader.staging import StagingRing


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.event: Any = None


class _FailingRing(StagingRing):
    """Pins ``limit`` slots, then fails like cudaHostRegister out of locked memory (the one
    method a ring subclass overrides to make a slot)."""

    limit = 2

    def _new_slot(self) -> Any:
        if self._made >= self.limit:
            raise RuntimeError("cudaHostRegister of 4096 bytes failed: out of memory")
        return _Slot(self._made)


def test_pinning_failure_warns_and_is_reported() -> None:
    ring = _FailingRing(4096, 5, method="alloc")
    held = [ring.acquire(), ring.acquire()]
    with pytest.warns(RuntimeWarning, match="2 of 5 slots"):
        assert ring.try_acquire() is None  # cannot grow: the pipeline runs with what it has
    assert ring.slots == 2
    note = ring.shortfall()
    assert note is not None and "2 of 5 slots" in note and "out of memory" in note
    for slot in held:
        ring.release(slot)
    assert ring.try_acquire() is not None


def test_a_full_ring_has_no_shortfall() -> None:
    ring = _FailingRing(4096, 2, method="alloc")
    held = [ring.acquire(), ring.acquire()]
    assert ring.try_acquire() is None
    assert ring.slots == 2 and ring.shortfall() is None
    for slot in held:
        ring.release(slot)
