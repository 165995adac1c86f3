"""The GPU pipeline's bookkeeping (ring slots, in-flight reads, copy events, verification), run on
CPU with stand-ins for CUDA streams and events, so it is exercised where there is no GPU. The real
thing runs in the ``gpu`` tests."""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path
from typing import Any

import pytest
import torch

import fastckpt
from fastckpt.config import get_config
from fastckpt.format.reader import open_partitions
from fastckpt.loader.executor import Executor, Sources
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.policy import Settings, decide
from fastckpt.tiers import GpuTier


class FakeEvent:
    recorded = 0

    def record(self, stream: Any = None) -> None:
        FakeEvent.recorded += 1

    def synchronize(self) -> None:
        pass


class FakeSlot:
    def __init__(self, index: int, nbytes: int) -> None:
        self.index = index
        self.nbytes = nbytes
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8)
        self.array = self.tensor.numpy()
        self.event: Any = None


class FakeRing:
    def __init__(self, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = slot_bytes
        self.slots = slots
        self._free: queue.Queue[FakeSlot] = queue.Queue()
        for i in range(slots):
            self._free.put(FakeSlot(i, slot_bytes))
        self.max_out = 0
        self.out = 0

    def acquire(self) -> FakeSlot:
        slot = self._free.get()
        self.out += 1
        self.max_out = max(self.max_out, self.out)
        return slot

    def try_acquire(self) -> FakeSlot | None:
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return None
        self.out += 1
        self.max_out = max(self.max_out, self.out)
        return slot

    def release(self, slot: FakeSlot) -> None:
        self.out -= 1
        self._free.put(slot)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def _executor(index: Any, plan: LoadPlan, mode: str, verify: bool) -> Executor:
    """An executor whose buffers are host tensors standing in for device memory: the policy
    decides reads from disk (``mode``), the sources are the files and a Loader's engine."""
    decisions = decide(plan, residency={}, settings=Settings(read_mode=mode, verify=verify))
    # the partitions' validated open files (closed with the test process)
    sources = Sources(engine=fastckpt.Loader().engine, files=open_partitions(index))
    ex = Executor(index, plan, decisions, sources, cfg=get_config(), verify=verify)
    for b in plan.buffers:
        ex.buffers[b.index] = torch.full((b.nbytes,), 0xEE, dtype=torch.uint8)
    return ex


def _run_pipeline(
    path: Path, slots: int, slot_bytes: int, verify: bool, mode: str = "direct"
) -> dict[str, Any]:
    index = fastckpt.read_index(path)
    plan = plan_load(index, "cpu", chunk_bytes=slot_bytes, verify=verify)
    ex = _executor(index, plan, mode, verify)
    ring = FakeRing(slot_bytes, slots)
    try:
        ex.pipeline(list(plan.reads), ring, [object(), object()])
    finally:
        ex.files.close()
    assert ring.out == 0, "every slot must be returned"
    assert ring.max_out <= slots
    if ex.verifier is not None:
        ex.verifier.finish()
    return ex.views()


@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("mode", ["direct", "buffered", "mixed"])
def test_pipeline_delivers_every_byte(
    tmp_path: Path, fake_cuda: None, slots: int, verify: bool, mode: str
) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(257 + 1000 * i, generator=g) for i in range(12)}
    sd["tied"] = sd["w3"]
    path = tmp_path / "ck"
    fastckpt.save(sd, path, partition_bytes=64 << 10, metadata=None)
    out = _run_pipeline(path, slots, 8192, verify, mode)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert out["tied"] is out["w3"]


def test_pipeline_failure_returns_slots(
    tmp_path: Path, fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = {f"w{i}": torch.randn(5000) for i in range(8)}
    path = tmp_path / "ck"
    fastckpt.save(sd, path)
    index = fastckpt.read_index(path)
    plan = plan_load(index, "cpu", chunk_bytes=4096)
    ex = _executor(index, plan, "direct", False)
    ring = FakeRing(4096, 3)
    calls = {"n": 0}
    real_submit = ex.engine.submit

    def failing_submit(reads: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(5, "injected", "x")
        return real_submit(reads)

    monkeypatch.setattr(ex.engine, "submit", failing_submit)
    with pytest.raises(OSError, match="injected"):
        ex.pipeline(list(plan.reads), ring, [object()])
    ex.files.close()
    assert ring.out == 0


def test_gpu_tier_with_the_fake_cuda_pipeline(tmp_path: Path, fake_cuda: None) -> None:
    """Buffers filled by the (fake-CUDA) staging pipeline go to the GPU tier; a caller who
    modifies a tensor in place gets it dropped, a caller who does not gets the same buffers back,
    and every load returns the checkpoint's bytes."""
    g = torch.Generator().manual_seed(2)
    sd = {f"w{i}": torch.randn(700 + 300 * i, generator=g) for i in range(6)}
    path = tmp_path / "ck"
    fastckpt.save(sd, path, partition_bytes=16 << 10, metadata=None)
    index = fastckpt.read_index(path)
    plan = plan_load(index, "cpu", chunk_bytes=8192)
    tier = GpuTier(1 << 20)

    def load() -> dict[str, Any]:
        item = tier.revive("ck")
        if item is not None:  # a GPU-tier hit: views of the kept buffers, nothing read
            ex = _executor(index, plan, "direct", False)
            ex.buffers.update(item.buffers)
            tier.unpin("ck")
            return ex.views()
        ex = _executor(index, plan, "direct", False)
        ring = FakeRing(8192, 3)
        try:
            ex.pipeline(list(plan.reads), ring, [object()])
        finally:
            ex.files.close()
        views = ex.views()
        tier.offer("ck", dict(ex.buffers))
        return views

    out = load()
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    out["w2"].mul_(-1)  # modified in place while lent out
    del out
    again = load()  # dropped, read again
    assert tier.stats().dropped_modified == 1
    assert all(torch.equal(again[k], v) for k, v in sd.items())
    ptr = again["w1"].data_ptr()
    del again
    third = load()  # revived: same memory, same bytes
    assert third["w1"].data_ptr() == ptr
    assert all(torch.equal(third[k], v) for k, v in sd.items())
    assert tier.stats().hits == 1
