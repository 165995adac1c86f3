"""The DRAM tier's CPU-only items hold the checkpoint's own page cache (locked), through the
public Loader and its ``page_locker`` seam: bytes, copy-on-write, republish, fallback."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import make_ckpt, same

import fastckpt
from fastckpt.tiers.held import lock_file_pages


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.path: Path(p.path).read_bytes() for p in fastckpt.read_index(path).partitions}


class Locks:
    """A page locker that locks for real and counts, or fails on a chosen call."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.held = 0
        self.fail_at = fail_at

    def __call__(self, fd: int, nbytes: int) -> Any:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError(errno.ENOMEM, "Cannot allocate memory (RLIMIT_MEMLOCK)")
        release = lock_file_pages(fd, nbytes)
        self.held += 1

        def unlock() -> None:
            self.held -= 1
            release()

        return unlock


@pytest.fixture
def ck(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return make_ckpt(tmp_path, "ck", 0)


def test_cpu_items_hold_page_cache_and_hit_bitwise(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    parts = len(fastckpt.read_index(path).partitions)
    assert parts > 1
    locks = Locks()
    with fastckpt.Loader(dram_tier_bytes=1 << 20, page_locker=locks) as loader:
        first, s1 = loader.load(path, stats=True)
        second, s2 = loader.load(path, stats=True)
        assert same(first, sd) and same(second, sd)
        assert s2.path_taken == "dram-tier" and not s1.notes and not s2.notes
        info = loader.cache_info()["dram"]
        assert (info["held_items"], info["lock_failures"], info["hits"]) == (1, 0, 1)
        assert locks.held == parts  # one lock per partition, kept by the tier
        assert loader.evict(path) == 1
        assert locks.held == 0  # evicting unlocks
        assert same(second, sd)  # tensors handed out stay valid


def test_caller_writes_change_neither_the_tier_nor_the_file(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    on_disk = file_bytes(path)
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        for _ in range(3):
            loaded = loader.load(path)
            assert same(loaded, sd)
            for t in loaded.values():
                t.view(torch.uint8).fill_(0x5A)  # the caller scribbles over every tensor
        assert loader.cache_info()["dram"]["held_items"] == 1
    assert file_bytes(path) == on_disk


def test_republish_does_not_change_a_held_item(tmp_path: Path) -> None:
    path, sd = make_ckpt(tmp_path, "ck", 1)
    old = file_bytes(path)
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path)
        (key,) = loader.dram_tier.keys()
        # republish every partition in place by rename, with other bytes
        for name, data in old.items():
            tmp = name + ".new"
            with open(tmp, "wb") as f:
                f.write(bytes(255 - b for b in data[:64]) + data[64:])
            os.rename(tmp, name)
        item = loader.dram_tier.get(key)
        assert item is not None and item.held
        index = fastckpt.read_index(path)
        for i, part in enumerate(index.partitions):
            block = item.blocks[i]
            assert bytes(block.map_private(0, part.nbytes)) == old[part.path]  # the old inode
        # a load now sees the republished files (a new identity), not the held item
        loaded = loader.load(path)
        assert not same(loaded, sd)
        assert loader.cache_info()["dram"]["items"] == 2


def test_lock_failure_falls_back_to_memory_copies(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    locks = Locks(fail_at=2)  # the second partition cannot be locked
    with fastckpt.Loader(dram_tier_bytes=1 << 20, page_locker=locks) as loader:
        first, s1 = loader.load(path, stats=True)
        assert same(first, sd) and locks.held == 0  # the first lock was released
        assert any("could not lock" in n and "RLIMIT_MEMLOCK" in n for n in s1.notes)
        for t in first.values():
            t.view(torch.uint8).fill_(0x11)
        second, s2 = loader.load(path, stats=True)
        assert same(second, sd) and s2.path_taken == "dram-tier"
        info = loader.cache_info()["dram"]
        assert (info["held_items"], info["lock_failures"], info["items"]) == (0, 1, 1)
        assert "RLIMIT_MEMLOCK" in info["last_lock_error"]


def test_no_locker_means_memory_copies(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20, page_locker=None) as loader:
        loader.load(path)
        loaded, stats = loader.load(path, stats=True)
        assert same(loaded, sd) and stats.path_taken == "dram-tier" and not stats.notes
        info = loader.cache_info()["dram"]
        assert (info["held_items"], info["lock_failures"]) == (0, 0)


def test_private_copy_never_maps_the_held_files(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path)  # fills: holds the page cache
        loaded, stats = loader.load(path, private_copy=True, stats=True)
        assert same(loaded, sd) and "dram" not in stats.tier_nbytes
        assert stats.path_taken != "dram-tier"
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path, private_copy=True)  # fills memory copies, not the page cache
        loaded, stats = loader.load(path, private_copy=True, stats=True)
        assert same(loaded, sd) and stats.path_taken == "dram-tier"
        assert loader.cache_info()["dram"]["held_items"] == 0


@pytest.mark.gpu
def test_gpu_load_from_a_held_item(ck: tuple[Path, Any]) -> None:
    path, sd = ck
    with fastckpt.Loader(dram_tier_bytes=1 << 20) as loader:
        loader.load(path)  # a CPU load fills: the item holds the page cache
        loaded, stats = loader.load(path, "cuda:0", stats=True)
        assert same({k: v.cpu() for k, v in loaded.items()}, sd)
        assert stats.path_taken == "dram-tier"
        assert any("not pinned" in n for n in stats.notes)


def test_identity_is_of_the_files_opened(tmp_path: Path) -> None:
    from fastckpt.format.reader import open_checkpoint
    from fastckpt.loader.tiering import checkpoint_identity

    path, _ = make_ckpt(tmp_path, "ck", 2)
    with open_checkpoint(path) as ck:
        before = checkpoint_identity(ck.index, ck.partitions)
        assert before == checkpoint_identity(ck.index)  # nothing changed: the same key
        _, _ = make_ckpt(tmp_path, "ck2", 3)
        os.rename(path, tmp_path / "old")
        os.rename(tmp_path / "ck2", path)
        # the load reads the files it opened: it keys them as they are, not the new ones
        assert checkpoint_identity(ck.index, ck.partitions) == before
        assert checkpoint_identity(ck.index) != before
