"""The whole device path on CPU: a Loader whose device stage is a fake device (host memory and a
``FakeCopyBackend``: copies on worker threads, after a delay, checking that no staging slot was
overwritten before its copy ran). Everything else is what runs on a GPU: the policy, the
executor, the C++ copy pipeline, the staging ring and its growth, the DRAM tier's pinned host
copies, verification, windows of ``iter_tensors``."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import bits, same

import fastckpt
from fastckpt.errors import ChecksumError
from fastckpt.loader.devstage import fake_stage_factory

MiB = 1 << 20


def _ckpt(root: Path, *, numel: int = 1 << 20, n: int = 8, seed: int = 0) -> tuple[Path, Any]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(numel + 1000 * i, generator=g) for i in range(n)}
    sd["mask"] = torch.tensor([True, False] * 500)
    sd["tied"] = sd["layer0.w"]
    path = root / "ck"
    fastckpt.save(sd, path, partition_bytes=16 * MiB, metadata=None)
    return path, sd


def _loader(factory: Any, **settings: Any) -> fastckpt.Loader:
    return fastckpt.Loader(device_stage=factory, **settings)


def test_bytes_land_and_several_copies_are_in_flight(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    factory = fake_stage_factory(streams=4, delay_s=0.004, slot_bytes=MiB, slots=12, min_slots=12)
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        got, st = loader.load(path, "cuda:0", stats=True)
    assert same(got, sd)
    assert got["tied"] is got["layer0.w"]
    assert st.max_copies_in_flight >= 3, st
    assert factory.backend.max_in_flight >= 3
    assert factory.backend.violations == 0, factory.backend.violation_notes
    assert st.copies == factory.backend.copies > 8 * 4


@pytest.mark.parametrize("slot_bytes", [4096, 64 << 10, MiB])
@pytest.mark.parametrize("slots", [1, 2, 5])
def test_no_slot_is_reused_before_its_copy_ran(tmp_path: Path, slot_bytes: int, slots: int) -> None:
    """Many more reads than slots, copies slower than reads: every slot is reused many times,
    and the fake device checks each copy's source bytes when the copy finally runs."""
    path, sd = _ckpt(tmp_path, numel=(1 << 16) + 77, n=5)
    factory = fake_stage_factory(
        streams=3, delay_s=0.0005, slot_bytes=slot_bytes, slots=slots, min_slots=slots
    )
    with _loader(factory, ring_slot_bytes=slot_bytes) as loader:
        got = loader.load(path, "cuda:0")
    assert same(got, sd)
    assert factory.backend.violations == 0, factory.backend.violation_notes
    assert factory.backend.pending == 0


def test_the_ring_starts_small_and_grows_for_a_large_load(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    factory = fake_stage_factory(slot_bytes=MiB, slots=16, min_slots=2)
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        assert same(loader.load(path, "cuda:0"), sd)
        factory.ring.wait_growth(10)
        assert factory.ring.total == 16  # the load was larger than the ring: it grew
        assert loader.cache_info()["ring"]["slots"] == 16


def test_a_small_load_does_not_grow_the_ring(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=1000, n=2)
    factory = fake_stage_factory(slot_bytes=MiB, slots=16, min_slots=2)
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        assert same(loader.load(path, "cuda:0"), sd)
    factory.ring.wait_growth(10)
    assert factory.ring.total == 2


def test_closing_the_ring_during_a_load_stops_it_and_frees_every_slot(tmp_path: Path) -> None:
    path, _ = _ckpt(tmp_path)
    factory = fake_stage_factory(streams=2, delay_s=0.05, slot_bytes=MiB, slots=4, min_slots=4)
    errors: list[BaseException] = []
    with _loader(factory, ring_slot_bytes=MiB) as loader:

        def run() -> None:
            try:
                loader.load(path, "cuda:0")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while factory.backend.copies == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert factory.ring.close(timeout_s=20)
        t.join(20)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], RuntimeError), errors
    assert factory.ring.slots.available == factory.ring.slots.total
    assert factory.backend.pending == 0


def test_closing_the_loader_during_a_load_stops_it(tmp_path: Path) -> None:
    path, _ = _ckpt(tmp_path)
    factory = fake_stage_factory(streams=2, delay_s=0.05, slot_bytes=MiB, slots=4, min_slots=4)
    loader = _loader(factory, ring_slot_bytes=MiB)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loader.load(path, "cuda:0")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while factory.backend.copies == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    loader.close()
    t.join(30)
    assert not t.is_alive()
    assert errors, "the load should have been stopped"
    assert factory.ring.slots.available == factory.ring.slots.total
    assert factory.backend.pending == 0


@pytest.mark.parametrize("window", [4096, 3 * MiB, 64 * MiB])
def test_iter_tensors_to_the_device_in_windows(tmp_path: Path, window: int) -> None:
    path, sd = _ckpt(tmp_path)
    factory = fake_stage_factory(streams=2, delay_s=0.0005, slot_bytes=MiB, slots=6)
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        eng = loader.engine()
        direct0 = eng.bytes_direct
        got = dict(fastckpt.iter_tensors(path, "cuda:0", window_bytes=window, loader=loader))
        assert eng.bytes_direct == direct0  # a warm checkpoint is read from the page cache
    assert same(got, sd)
    assert factory.backend.violations == 0


def test_verify_checks_every_chunk_on_the_device_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(300_000, generator=g) for i in range(4)}
    path = tmp_path / "ck"
    monkeypatch.setenv("FASTCKPT_CHECKSUM_CHUNK_BYTES", str(256 << 10))
    fastckpt.save(sd, path, metadata=None)
    factory = fake_stage_factory(slot_bytes=MiB, slots=4)
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        got, st = loader.load(path, "cuda:0", verify=True, stats=True)
        total = sum(len(p.checksums or ()) for p in fastckpt.read_index(path).partitions)
        assert same(got, sd) and st.verified_chunks == total > 4
        index = fastckpt.read_index(path)
        part = index.partitions[0].path
        with open(part, "r+b") as f:
            f.seek(index.tensors["w2"].offset + 5)
            byte = f.read(1)
            f.seek(index.tensors["w2"].offset + 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ChecksumError):
            loader.load(path, "cuda:0", verify=True)


def test_dram_tier_hits_copy_from_pinned_memory(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    factory = fake_stage_factory(slot_bytes=MiB, slots=4)
    with _loader(factory, ring_slot_bytes=MiB, dram_tier_bytes=512 * MiB) as loader:
        first, s1 = loader.load(path, "cuda:0", stats=True)
        assert s1.flight == "leader" and same(first, sd)
        second, s2 = loader.load(path, "cuda:0", stats=True)
        assert same(second, sd)
        assert s2.path_taken == "dram-tier"
        assert not any("not pinned" in n for n in s2.notes), s2.notes
    assert factory.backend.violations == 0


def test_a_device_map_spreads_buffers_over_devices(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    factory = fake_stage_factory(slot_bytes=MiB, slots=8)
    dmap = {"layer0": "cuda:1", "": "cuda:0"}
    with _loader(factory, ring_slot_bytes=MiB) as loader:
        got, st = loader.load(path, dmap, stats=True)
    assert same(got, sd) and set(st.devices) == {"cuda:0", "cuda:1"}


def test_a_forked_child_loads_through_its_own_ring(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=5000, n=3)
    factory = fake_stage_factory(slot_bytes=MiB, slots=4)
    loader = _loader(factory, ring_slot_bytes=MiB)
    assert same(loader.load(path, "cuda:0"), sd)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            got = loader.load(path, "cuda:0")
            code = 0 if all(torch.equal(bits(got[k]), bits(sd[k])) for k in sd) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    loader.close()
    assert os.waitstatus_to_exitcode(status) == 0
