"""The pinned staging ring on its own (no load): small first, grown in the background, a pinning
failure visible, closed with every slot back. Runs on CPU with the fake copy backend."""

from __future__ import annotations

from typing import Any

import pytest

from fastckpt import io_engine
from fastckpt.loader.staging import StagingRing

SLOT = 64 << 10


def _backend() -> Any:
    return io_engine.FakeCopyBackend(2, 0.0)


def test_the_ring_pins_its_first_slots_then_grows_in_the_background() -> None:
    ring = StagingRing(_backend(), SLOT, 6, min_slots=2)
    assert ring.total == 0  # nothing pinned before the first load
    ring.ready()
    assert ring.total == 2 and ring.slots.available == 2
    ring.grow(5)
    ring.wait_growth(10)
    assert ring.total == 5
    ring.grow(100)  # never past max_slots
    ring.wait_growth(10)
    assert ring.total == 6
    assert ring.close(timeout_s=10)
    assert ring.closed and ring.slots.closed


class _FailAfter:
    """Makes pinned buffers until ``limit``, then fails like cuMemHostRegister out of locked
    memory."""

    def __init__(self, backend: Any, limit: int) -> None:
        self.backend = backend
        self.limit = limit
        self.made = 0

    def __call__(self, nbytes: int) -> Any:
        if self.made >= self.limit:
            raise RuntimeError("cuMemHostRegister_v2 failed: CUDA_ERROR_OUT_OF_MEMORY")
        self.made += 1
        return io_engine.PinnedBuffer(self.backend, nbytes, "register")


def test_a_pinning_failure_warns_and_is_reported() -> None:
    backend = _backend()
    ring = StagingRing(backend, SLOT, 5, min_slots=3, make_buffer=_FailAfter(backend, 2))
    with pytest.warns(RuntimeWarning, match="2 of 5 slots"):
        ring.ready()  # runs with what it has
    assert ring.total == 2
    note = ring.shortfall()
    assert note is not None and "2 of 5 slots" in note and "OUT_OF_MEMORY" in note
    ring.grow(5)  # no retry storm after a failure
    ring.wait_growth(10)
    assert ring.total == 2
    ring.close(timeout_s=10)


def test_no_slot_at_all_is_an_error() -> None:
    backend = _backend()
    ring = StagingRing(backend, SLOT, 4, make_buffer=_FailAfter(backend, 0))
    with pytest.raises(RuntimeError, match="OUT_OF_MEMORY"):
        ring.ready()


def test_a_full_ring_has_no_shortfall() -> None:
    ring = StagingRing(_backend(), SLOT, 2, min_slots=2)
    ring.ready()
    assert ring.total == 2 and ring.shortfall() is None
    ring.close(timeout_s=10)
