"""A closed Loader refuses use; a Loader dropped without ``close()`` frees its tiers' items
(locked memory, descriptors) when it is collected."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from loader_helpers import make_ckpt, same

import fastckpt


def _locked_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    return 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_closed_loader_refuses_to_load_and_refill_its_tiers(tmp_path: Path) -> None:
    path, sd = make_ckpt(tmp_path, "ck", 0)
    loader = fastckpt.Loader(dram_tier_bytes=8 << 20)
    assert same(loader.load(path), sd)
    loader.close()
    for use in (
        lambda: loader.load(path),
        lambda: loader.prefetch(path, tier="dram"),
        lambda: loader.evict(path),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            use()
    assert loader.dram_tier.used_bytes == 0 and loader.cache_info()["dram"]["items"] == 0
    loader.close()  # again: nothing to do, no error


def test_a_loader_dropped_without_close_frees_its_tier_items(tmp_path: Path) -> None:
    path, sd = make_ckpt(tmp_path, "ck", 1, numel=1 << 18)  # a few MiB
    gc.collect()
    fds0, locked0 = _fds(), _locked_kib()
    loader = fastckpt.Loader(dram_tier_bytes=64 << 20)
    loaded = loader.load(path)
    assert same(loaded, sd)
    del loaded
    gc.collect()
    held_fds, held_locked = _fds(), _locked_kib()
    assert loader.dram_tier.used_bytes > 0 and (held_fds > fds0 or held_locked > locked0)
    del loader
    gc.collect()
    assert _fds() <= fds0 and _locked_kib() <= locked0
