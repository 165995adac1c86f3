"""``fastckpt.Loader``: tiers through the public session object, concurrency, mutation, prefetch,
eviction, the SSD tier, and the default Loader."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import PAGE, make_ckpt, same
from safetensors.torch import save_file

import fastckpt
from fastckpt.loader.api import default_loader
from fastckpt.loader.sources import open_partition


def ckpt_bytes(path: Path) -> int:
    return sum(p.nbytes for p in fastckpt.read_index(path).partitions)


@pytest.fixture
def ck(tmp_path: Path) -> tuple[Path, Any]:
    return make_ckpt(tmp_path, "ck", 0)


# ------------------------------------------------------------------ DRAM tier


def test_dram_tier_fill_then_hit(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        first, s1 = loader.load(path, stats=True)
        second, s2 = loader.load(path, stats=True)
        assert same(first, sd) and same(second, sd)
        assert {d[2] for d in s1.decisions} == {"dram-tier"} and s1.flight == "leader"
        assert {d[2] for d in s2.decisions} == {"dram-tier"} and s2.flight == ""
        assert s2.tier_nbytes == {"dram": sum(b for b in s2.tier_nbytes.values())}
        info = loader.cache_info()["dram"]
        assert (info["hits"], info["misses"], info["items"]) == (1, 1, 1)
        assert info["used_bytes"] == ckpt_bytes(path)


def test_cpu_mutation_never_reaches_the_tier(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        for _ in range(3):
            loaded = loader.load(path)
            assert same(loaded, sd)
            for t in loaded.values():
                t.view(torch.uint8).fill_(0x5A)  # the caller scribbles over every tensor
        assert loader.cache_info()["dram"]["hits"] == 2


def test_oversize_checkpoint_bypasses_without_evicting(tmp_path: Path) -> None:
    small, small_sd = make_ckpt(tmp_path, "small", 1, n=2, numel=500)
    big, big_sd = make_ckpt(tmp_path, "big", 2, n=8, numel=6000)
    budget = ckpt_bytes(small) + PAGE
    assert ckpt_bytes(big) > budget
    with fastckpt.Loader(dram_tier_bytes=budget) as loader:
        assert same(loader.load(small), small_sd)
        loaded, stats = loader.load(big, stats=True)
        assert same(loaded, big_sd)
        assert "dram" not in stats.tier_nbytes
        info = loader.cache_info()["dram"]
        assert info["items"] == 1 and info["evictions"] == 0


def test_republished_checkpoint_is_not_served_stale(tmp_path: Path) -> None:
    path, _ = make_ckpt(tmp_path, "ck", 3)
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path)
        _, new_sd = make_ckpt(tmp_path, "ck2", 4)
        os.rename(path, tmp_path / "old")
        os.rename(tmp_path / "ck2", path)
        assert same(loader.load(path), new_sd)


def test_prefetch_evict_and_cache_info(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        fut = loader.prefetch(path, tier="dram")
        assert fut.result(timeout=60) is True
        loaded, stats = loader.load(path, stats=True)
        assert same(loaded, sd) and stats.path_taken == "dram-tier"
        assert loader.evict(path) == 1
        assert loader.cache_info()["dram"]["items"] == 0
        assert same(loaded, sd)  # evicting never touches tensors already handed out
        with pytest.raises(ValueError, match="tier"):
            loader.prefetch(path, tier="tape")
        assert loader.prefetch(path, tier="ssd").result(timeout=60) is False  # no SSD tier


def test_verify_reads_the_files_not_the_tier(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path)
        loaded, stats = loader.load(path, verify=True, stats=True)
        assert same(loaded, sd) and stats.verified_chunks > 0
        assert "dram" not in stats.tier_nbytes


# ------------------------------------------------------------------ concurrency


def test_sixteen_threads_overlapping_checkpoints(tmp_path: Path) -> None:
    ckpts = [make_ckpt(tmp_path, f"c{i}", 10 + i, n=4, numel=4000) for i in range(4)]
    size = max(ckpt_bytes(p) for p, _ in ckpts)
    budget = 2 * size + PAGE  # room for two of the four
    opened = threading.Semaphore(0)

    def slow_open(index: Any, partition: int, src: Any, *, direct: bool | None) -> Any:
        time.sleep(0.02)  # widen the window in which concurrent loads meet
        opened.release()
        return open_partition(index, partition, src, direct=direct)

    loader = fastckpt.Loader(dram_tier_bytes=budget, open_partition=slow_open)
    errors: list[BaseException] = []
    flights: list[str] = []
    over_budget: list[int] = []
    done = threading.Event()
    start = threading.Barrier(16)

    def watch() -> None:
        while not done.is_set():
            used = loader.dram_tier.used_bytes
            if used > budget:
                over_budget.append(used)
            time.sleep(0.001)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(6):
                path, sd = ckpts[(i + j * (i % 3 + 1)) % 4]
                loaded, stats = loader.load(path, stats=True)
                flights.append(stats.flight)
                if not same(loaded, sd):
                    raise AssertionError(f"thread {i}: wrong bytes from {path}")
                next(iter(loaded.values())).add_(1.0)  # callers modify what they got
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors[0]
    assert not over_budget
    info = loader.cache_info()
    assert info["dram"]["used_bytes"] <= budget
    # single flight: some loads waited for a concurrent fill of the same checkpoint
    assert info["single_flight"]["followers"] > 0
    assert flights.count("follower") == info["single_flight"]["followers"]
    assert flights.count("leader") == info["single_flight"]["leaders"]
    assert info["dram"]["evictions"] > 0  # the budget forced LRU work
    loader.close()


# ------------------------------------------------------------------ SSD tier


@pytest.mark.parametrize("mode", ["background", "inline"])
def test_ssd_tier_converts_stock_safetensors_once(tmp_path: Path, mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    sd = {"a": torch.randn(1000, generator=g), "b": torch.randn(33, 7, generator=g)}
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    ssd = tmp_path / "ssd"
    tier = {"ssd_tier_bytes": 10 << 20, "ssd_tier_dir": str(ssd), "ssd_convert": mode}
    with fastckpt.Loader(**tier) as loader:
        loaded, stats = loader.load(src, stats=True)
        assert same(loaded, sd)
        # inline: served from the converted copy; background: from the source, the copy after
        assert stats.kind == ("fastckpt" if mode == "inline" else "safetensors")
        assert loader.conversions.wait(60)
        info = loader.cache_info()["ssd"]
        assert (info["misses"], info["items"]) == (1, 1)
    entries = [n for n in os.listdir(ssd) if not n.startswith(".")]
    assert len(entries) == 1
    with fastckpt.Loader(**tier) as again:
        loaded, stats = again.load(src, stats=True)
        assert same(loaded, sd) and stats.kind == "fastckpt"
        assert again.cache_info()["ssd"]["hits"] == 1
        # a rewritten source gets a new copy, never the old one
        sd2 = {"a": torch.zeros(1000), "b": torch.ones(33, 7)}
        save_file(sd2, str(src))
        assert same(again.load(src), sd2)
        assert again.conversions.wait(60)
        loaded, stats = again.load(src, stats=True)
        assert same(loaded, sd2) and stats.kind == "fastckpt"
        assert again.evict(src) == 1


def test_ssd_tier_budget_evicts_lru(tmp_path: Path) -> None:
    srcs = []
    for i in range(3):
        sd = {"w": torch.full((20000,), float(i))}
        p = tmp_path / f"m{i}.safetensors"
        save_file(sd, str(p))
        srcs.append((p, sd))
    with fastckpt.Loader(ssd_tier_bytes=200_000, ssd_tier_dir=str(tmp_path / "ssd")) as loader:
        for p, sd in srcs:
            assert same(loader.load(p), sd)
            assert loader.conversions.wait(60)  # the copy is made after the load
            assert loader.ssd_tier is not None
            assert loader.ssd_tier.used_bytes <= 200_000
        assert loader.cache_info()["ssd"]["evictions"] >= 1
        assert loader.cache_info()["ssd"]["conversions"]["done"] == 3


def test_evict_of_a_converted_source_drops_the_copys_dram_item(tmp_path: Path) -> None:
    # a load that reads the SSD tier's copy keys its DRAM-tier item by the copy's root
    sd = {"w": torch.arange(5000, dtype=torch.float32)}
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    tiers = {"ssd_tier_bytes": 1 << 20, "ssd_tier_dir": str(tmp_path / "ssd")}
    with fastckpt.Loader(**tiers) as first:  # makes the copy
        assert same(first.load(src), sd)
        assert first.conversions.wait(60)
    with fastckpt.Loader(dram_tier_bytes=1 << 20, **tiers) as loader:
        loaded, stats = loader.load(src, stats=True)
        assert same(loaded, sd) and stats.kind == "fastckpt"
        info = loader.cache_info()
        assert len(info["dram"]["keys"]) == 1 and len(info["ssd"]["keys"]) == 1
        assert info["dram"]["keys"][0]["key"][0] == stats.path  # the copy's root
        assert loader.evict(src) == 2
        info = loader.cache_info()
        assert info["dram"]["keys"] == [] and info["ssd"]["keys"] == []
        assert same(loader.load(src), sd)


# ------------------------------------------------------------------ default Loader


def test_default_loader_and_use(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    assert fastckpt.load(path, loader=None) is not None
    assert default_loader() is default_loader()
    mine = fastckpt.Loader(dram_tier_bytes=1 << 20)
    with mine.use():
        assert default_loader() is mine
        fastckpt.load(path)
    assert default_loader() is not mine
    loaded, stats = fastckpt.load(path, loader=mine, stats=True)
    assert same(loaded, sd) and stats.path_taken == "dram-tier"
    mine.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown fastckpt setting"):
        fastckpt.Loader(warp_speed=True)
    with pytest.raises(ValueError, match="negative"):
        fastckpt.Loader(dram_tier_bytes=-1)


# ------------------------------------------------------------------ GPU (real)


@pytest.mark.gpu
def test_gpu_tier_revives_and_drops_modified(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(gpu_tier_bytes=1 << 30) as loader:
        first, s1 = loader.load(path, "cuda:0", stats=True)
        assert same(first, sd) and "gpu-tier" not in s1.path_taken
        first["layer0.w"].add_(1.0)  # modified while lent out
        del first
        second, s2 = loader.load(path, "cuda:0", stats=True)
        assert same(second, sd) and "gpu-tier" not in s2.path_taken
        ptr = second["layer1.w"].data_ptr()
        del second
        third, s3 = loader.load(path, "cuda:0", stats=True)
        assert same(third, sd) and s3.path_taken == "gpu-tier"
        assert third["layer1.w"].data_ptr() == ptr  # the very buffers, no copy
        assert loader.cache_info()["gpu"]["dropped_modified"] == 1


@pytest.mark.gpu
def test_gpu_load_from_dram_tier(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        assert same(loader.load(path, "cuda:0"), sd)
        loaded, stats = loader.load(path, "cuda:0", stats=True)
        assert same(loaded, sd) and stats.path_taken == "dram-tier"


# ------------------------------------------------------------------ read-mode profile


def test_cold_load_uses_a_measured_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastckpt import io_engine
    from fastckpt.loader import profile

    profile.forget()
    sd = {"w": torch.randn(3 << 20)}  # 12 MiB: large enough to probe
    path = tmp_path / "ck"
    fastckpt.save(sd, path, metadata=None)
    for p in fastckpt.read_index(path).partitions:
        io_engine.drop_page_cache(p.path)
    loaded, stats = fastckpt.Loader().load(path, stats=True)
    assert same(loaded, sd)
    prof = stats.read_profile
    assert prof is not None and prof["source"] == "probe"
    assert prof["probe_bytes"] >= profile.PROBE_MIN_BYTES and prof["buffered_gbps"] > 0
    assert stats.path_taken in (prof["best"], prof["best_cpu"], "page-cache-read", "page-cache-map")
    stored = list((Path(os.environ["XDG_CACHE_HOME"]) / "fastckpt" / "profile").glob("read-*.json"))
    assert len(stored) == 1
    # the configuration overrides the profile
    monkeypatch.setenv("FASTCKPT_READ_MODE", "buffered")
    del loaded  # a mapped load keeps the pages it maps in the page cache
    gc.collect()
    for p in fastckpt.read_index(path).partitions:
        io_engine.drop_page_cache(p.path)
    loaded, stats = fastckpt.Loader().load(path, stats=True)
    assert same(loaded, sd) and stats.path_taken == "buffered" and stats.read_profile is None
    profile.forget()


def test_budgets_and_switches_from_the_environment(
    ck: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sd = ck
    monkeypatch.setenv("FASTCKPT_DRAM_TIER_BYTES", str(1 << 20))
    assert same(fastckpt.Loader().load(path), sd)
    monkeypatch.setenv("FASTCKPT_GPU_TIER_BYTES", "0x1000")
    with fastckpt.Loader() as loader:
        assert loader.dram_tier.capacity_bytes == 1 << 20
        assert loader.gpu_tier.capacity_bytes == 4096
        assert loader.ssd_tier is None
        loader.load(path)
        assert loader.load(path, stats=True)[1].path_taken == "dram-tier"
    with fastckpt.Loader(dram_tier_bytes=0) as explicit:  # arguments win over the environment
        assert explicit.dram_tier.capacity_bytes == 0
    monkeypatch.setenv("FASTCKPT_READ_MODE", "sideways")
    with pytest.raises(ValueError, match="FASTCKPT_READ_MODE"):
        fastckpt.Loader()


def test_failed_fill_leaves_nothing_behind(ck: tuple[Path, Any]) -> None:
    path, _ = ck
    index = fastckpt.read_index(path)
    os.truncate(index.partitions[-1].path, 4096)  # changed after the index was read
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        with pytest.raises((fastckpt.FormatError, OSError)):
            loader.load(index)
        info = loader.cache_info()
        assert info["dram"]["items"] == 0 and info["dram"]["used_bytes"] == 0
        assert info["pool"]["retained_bytes"] == 0
