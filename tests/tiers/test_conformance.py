"""What every tier promises (``TierTests``), run once per tier by subclassing, and a hypothesis
state machine checking the shared LRU rules against a plain ``OrderedDict`` model."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastckpt.tiers import (
    DramTier,
    GpuItem,
    GpuTier,
    HostPool,
    LruTier,
    SsdTier,
    lock_file_pages,
)

PAGE = 4096


class TierTests:
    """Subclass and implement ``make`` (a tier of ``capacity`` bytes) and ``value`` (an item of
    ``nbytes`` for that tier)."""

    def make(self, capacity: int) -> LruTier[Any]:
        raise NotImplementedError

    def value(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> Any:
        raise NotImplementedError

    def put(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> bool:
        return tier.put(key, self.value(tier, key, nbytes), nbytes)

    # --------------------------------------------------------------------------------------
    def test_empty(self) -> None:
        tier = self.make(10 * PAGE)
        assert tier.capacity_bytes == 10 * PAGE
        assert tier.used_bytes == 0
        assert not tier.holds("a")
        assert tier.get("a") is None
        s = tier.stats()
        assert (s.hits, s.misses, s.items) == (0, 1, 0)

    def test_put_get_counts(self) -> None:
        tier = self.make(10 * PAGE)
        assert self.put(tier, "a", 2 * PAGE)
        assert tier.holds("a")
        assert tier.used_bytes == 2 * PAGE
        assert tier.get("a") is not None
        assert tier.get("b") is None
        s = tier.stats()
        assert (s.hits, s.misses, s.bytes_in, s.bytes_out) == (1, 1, 2 * PAGE, 2 * PAGE)

    def test_put_existing_key_keeps_first(self) -> None:
        tier = self.make(10 * PAGE)
        assert self.put(tier, "a", PAGE)
        assert not self.put(tier, "a", PAGE)
        assert tier.used_bytes == PAGE

    def test_lru_evicts_least_recent(self) -> None:
        tier = self.make(3 * PAGE)
        for k in "abc":
            assert self.put(tier, k, PAGE)
        tier.get("a")  # b is now least recent
        assert self.put(tier, "d", PAGE)
        assert tier.keys() == ["c", "a", "d"]
        assert tier.stats().evictions == 1
        assert tier.used_bytes <= tier.capacity_bytes

    def test_pinned_never_evicted(self) -> None:
        tier = self.make(2 * PAGE)
        self.put(tier, "a", PAGE)
        self.put(tier, "b", PAGE)
        assert tier.pin("a")
        assert not tier.evict("a")
        assert self.put(tier, "c", PAGE)  # evicts b, not a
        assert tier.holds("a") and not tier.holds("b")
        assert tier.pin("c")
        assert not self.put(tier, "d", PAGE)  # everything in use: bypass
        assert tier.stats().bypasses == 1
        tier.unpin("a")
        assert self.put(tier, "d", PAGE)
        assert not tier.holds("a")

    def test_pins_nest_and_unpin_unknown_raises(self) -> None:
        tier = self.make(2 * PAGE)
        self.put(tier, "a", PAGE)
        tier.pin("a")
        tier.pin("a")
        tier.unpin("a")
        assert not tier.evict("a")
        tier.unpin("a")
        with pytest.raises(KeyError):
            tier.unpin("a")
        assert not tier.pin("missing")
        assert tier.evict("a")

    def test_oversize_bypasses_without_evicting(self) -> None:
        tier = self.make(4 * PAGE)
        self.put(tier, "a", PAGE)
        assert not self.put(tier, "huge", 5 * PAGE)
        assert tier.holds("a") and not tier.holds("huge")
        assert tier.stats().bypasses == 1
        assert tier.stats().evictions == 0

    def test_evict_and_clear(self) -> None:
        tier = self.make(4 * PAGE)
        for k in "ab":
            self.put(tier, k, PAGE)
        assert tier.evict("a")
        assert not tier.evict("a")
        assert tier.used_bytes == PAGE
        assert tier.clear() == 1
        assert tier.used_bytes == 0 and tier.keys() == []

    def test_negative_sizes_refused(self) -> None:
        with pytest.raises(ValueError):
            self.make(-1)
        tier = self.make(PAGE)
        with pytest.raises(ValueError):
            tier.put("a", self.value(tier, "a", PAGE), -1)


class TestDramTier(TierTests):
    def make(self, capacity: int) -> LruTier[Any]:
        return DramTier(capacity, HostPool())

    def value(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> Any:
        assert isinstance(tier, DramTier)
        item = tier.new_item({0: max(nbytes, 1)})
        item.blocks[0].buffer[:4] = b"abcd"
        return item

    def test_evicted_blocks_are_freed(self) -> None:
        pool = HostPool()
        tier = DramTier(PAGE, pool)
        item = tier.new_item({0: PAGE})
        tier.put("a", item, PAGE)
        block = item.blocks[0]
        assert tier.evict("a")
        assert block.closed  # never pinned: nothing worth keeping

    def test_private_mapping_is_copy_on_write(self) -> None:
        tier = DramTier(4 * PAGE, HostPool())
        item = tier.new_item({0: 2 * PAGE})
        block = item.blocks[0]
        block.buffer[:] = bytes(range(256)) * (2 * PAGE // 256)
        view = torch.frombuffer(block.map_private(0, 2 * PAGE), dtype=torch.uint8)
        view.add_(1)  # the caller's copy changes ...
        assert block.buffer[:3] == bytes([0, 1, 2])  # ... the cached bytes do not
        assert view[:3].tolist() == [1, 2, 3]


class TestDramTierHeldFiles(TierTests):
    """DRAM-tier items that hold a file's page cache (locked) instead of memfd copies."""

    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.n = 0

    def make(self, capacity: int) -> LruTier[Any]:
        return DramTier(capacity, HostPool())

    def value(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> Any:
        assert isinstance(tier, DramTier)
        self.n += 1
        path = self.dir / f"part{self.n}"
        path.write_bytes(bytes([self.n % 251]) * max(nbytes, 1))
        item = tier.hold_files({0: (os.open(path, os.O_RDONLY), max(nbytes, 1))})
        assert item is not None and item.held
        return item

    def test_evict_releases_the_lock_and_the_descriptor(self) -> None:
        released: list[int] = []

        def locker(fd: int, nbytes: int) -> Any:
            release = lock_file_pages(fd, nbytes)
            return lambda: (released.append(nbytes), release())

        tier = DramTier(4 * PAGE, HostPool(), page_locker=locker)
        path = self.dir / "p"
        path.write_bytes(b"x" * PAGE)
        item = tier.hold_files({0: (os.open(path, os.O_RDONLY), PAGE)})
        assert item is not None
        block = item.blocks[0]
        fd = block.fd
        assert fd is not None
        tier.put("a", item, PAGE)
        assert tier.evict("a") and block.closed and released == [PAGE]
        with pytest.raises(OSError):
            os.fstat(fd)  # the duplicate descriptor was closed

    def test_a_failed_lock_closes_everything(self) -> None:
        calls: list[int] = []

        def locker(fd: int, nbytes: int) -> Any:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(12, "over RLIMIT_MEMLOCK")
            return lambda: calls.append(-1)

        tier = DramTier(8 * PAGE, HostPool(), page_locker=locker)
        paths = [self.dir / f"q{i}" for i in range(3)]
        for p in paths:
            p.write_bytes(b"y" * PAGE)
        fds = [os.open(p, os.O_RDONLY) for p in paths]
        assert tier.hold_files({i: (fd, PAGE) for i, fd in enumerate(fds)}) is None
        assert calls[-1] == -1  # the first partition's lock was released
        assert (tier.lock_failures, tier.held_items) == (1, 0)
        assert "RLIMIT_MEMLOCK" in tier.last_lock_error
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # every descriptor handed over was closed

    def test_private_mapping_is_copy_on_write(self) -> None:
        tier = DramTier(4 * PAGE, HostPool())
        path = self.dir / "cow"
        data = bytes(range(256)) * (2 * PAGE // 256)
        path.write_bytes(data)
        item = tier.hold_files({0: (os.open(path, os.O_RDONLY), 2 * PAGE)})
        assert item is not None
        block = item.blocks[0]
        view = torch.frombuffer(block.map_private(0, 2 * PAGE), dtype=torch.uint8)
        view.add_(1)  # the caller's copy changes ...
        assert bytes(block.map_private(0, 2 * PAGE)) == data  # ... the held pages do not
        assert path.read_bytes() == data  # nor the file
        assert view[:3].tolist() == [1, 2, 3]


class TestGpuTier(TierTests):
    """The GPU tier's logic on host tensors (it does not depend on the device kind)."""

    def make(self, capacity: int) -> LruTier[Any]:
        return GpuTier(capacity)

    def value(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> Any:
        t = torch.zeros(nbytes, dtype=torch.uint8)
        return GpuItem({0: t}, {0: t._version})

    def test_in_use_until_every_view_is_gone(self) -> None:
        tier = GpuTier(4 * PAGE)
        buf = torch.arange(PAGE, dtype=torch.int32).view(torch.uint8)[:PAGE].clone()
        assert tier.offer("a", {0: buf})
        view = buf[8:16]
        del buf
        assert tier.pinned("a") and not tier.evict("a")
        assert tier.revive("a") is None  # still lent out
        derived = view[2:4]
        del view
        assert tier.pinned("a")  # a view of a view still holds the memory
        del derived
        assert not tier.pinned("a")
        item = tier.revive("a")
        assert item is not None and tier.pinned("a")  # pinned for the reviving load
        tier.unpin("a")

    def test_modified_while_lent_is_dropped(self) -> None:
        tier = GpuTier(4 * PAGE)
        buf = torch.zeros(PAGE, dtype=torch.uint8)
        tier.offer("a", {0: buf})
        view = buf[:16].view(torch.float32)
        del buf
        view.add_(1.0)  # in place, through a view: bumps the shared version counter
        del view
        assert tier.revive("a") is None
        assert not tier.holds("a")
        assert tier.stats().dropped_modified == 1

    def test_free_idle(self) -> None:
        tier = GpuTier(4 * PAGE)
        tier.offer("a", {0: torch.zeros(PAGE, dtype=torch.uint8)})
        buf = torch.zeros(PAGE, dtype=torch.uint8)
        tier.offer("b", {0: buf})
        kept = buf[1:]
        del buf
        assert tier.free_idle("cpu") == PAGE  # b is in use (``kept`` views it)
        assert kept.numel() == PAGE - 1
        assert tier.keys() == ["b"]


class TestSsdTier(TierTests):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "ssd"

    def make(self, capacity: int) -> LruTier[Any]:
        return SsdTier(capacity, str(self.dir))

    def value(self, tier: LruTier[Any], key: Hashable, nbytes: int) -> Any:
        assert isinstance(tier, SsdTier)
        staged = tier.stage(str(key))
        os.makedirs(staged)
        with open(os.path.join(staged, "data"), "wb") as f:
            f.write(b"x" * max(nbytes, 0))
        return staged

    def test_published_atomically_and_removed_on_evict(self) -> None:
        tier = self.make(4 * PAGE)
        assert isinstance(tier, SsdTier)
        self.put(tier, "k1", PAGE)
        assert sorted(os.listdir(self.dir)) == ["k1"]
        path = tier.get("k1")
        assert path is not None and os.path.isfile(os.path.join(path, "data"))
        tier.evict("k1")
        assert os.listdir(self.dir) == []

    def test_survives_restart_in_lru_order(self) -> None:
        tier = self.make(4 * PAGE)
        for k in ("k1", "k2"):
            self.put(tier, k, PAGE)
        os.utime(os.path.join(self.dir, "k2", ".last-used"), (1, 1))  # k2 least recent
        again = self.make(4 * PAGE)
        assert again.keys() == ["k2", "k1"]
        assert again.used_bytes >= 2 * PAGE

    def test_bypass_deletes_staged(self) -> None:
        tier = self.make(PAGE)
        assert not self.put(tier, "big", 2 * PAGE)
        assert os.listdir(self.dir) == []


# ------------------------------------------------------------------ LRU state machine

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
SIZES = st.integers(min_value=0, max_value=5).map(lambda n: n * PAGE)
CAPACITY = 8 * PAGE


class LruMachine(RuleBasedStateMachine):
    """The DRAM tier (real memfd blocks) against an ``OrderedDict`` LRU model."""

    def __init__(self) -> None:
        super().__init__()
        self.tier = self.new_tier()
        self.model: OrderedDict[str, list[int]] = OrderedDict()  # key -> [nbytes, pins]
        self.hits = self.misses = self.evictions = 0

    def new_tier(self) -> LruTier[Any]:
        return DramTier(CAPACITY, HostPool())

    def new_value(self, key: str, nbytes: int) -> Any:
        assert isinstance(self.tier, DramTier)
        return self.tier.new_item({0: max(nbytes, 1)})

    def discard(self, value: Any) -> None:
        assert isinstance(self.tier, DramTier)
        self.tier.discard(value)

    @rule(key=KEYS, nbytes=SIZES)
    def put(self, key: str, nbytes: int) -> None:
        value = self.new_value(key, nbytes)
        stored = self.tier.put(key, value, nbytes)
        expected = self._model_put(key, nbytes)
        assert stored == expected
        if not stored:
            self.discard(value)

    def _model_put(self, key: str, nbytes: int) -> bool:
        if key in self.model:
            self.model.move_to_end(key)
            return False
        if nbytes > CAPACITY:
            return False
        used = sum(v[0] for v in self.model.values())
        need = used + nbytes - CAPACITY
        victims: list[str] = []
        freed = 0
        for k, (size, pins) in self.model.items():
            if freed >= need:
                break
            if pins:
                continue
            victims.append(k)
            freed += size
        if need > 0 and freed < need:
            return False
        for k in victims if need > 0 else []:
            del self.model[k]
            self.evictions += 1
        self.model[key] = [nbytes, 0]
        return True

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        got = self.tier.get(key)
        if key in self.model:
            assert got is not None
            self.model.move_to_end(key)
            self.hits += 1
        else:
            assert got is None
            self.misses += 1

    @rule(key=KEYS)
    def pin(self, key: str) -> None:
        assert self.tier.pin(key) == (key in self.model)
        if key in self.model:
            self.model[key][1] += 1

    @precondition(lambda self: any(v[1] for v in self.model.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from([k for k, v in self.model.items() if v[1]]))
        self.tier.unpin(key)
        self.model[key][1] -= 1

    @rule(key=KEYS)
    def evict(self, key: str) -> None:
        removed = self.tier.evict(key)
        expected = key in self.model and self.model[key][1] == 0
        assert removed == expected
        if expected:
            del self.model[key]
            self.evictions += 1

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.tier.keys() == list(self.model)
        assert self.tier.used_bytes == sum(v[0] for v in self.model.values())
        assert self.tier.used_bytes <= self.tier.capacity_bytes
        s = self.tier.stats()
        assert (s.hits, s.misses, s.evictions) == (self.hits, self.misses, self.evictions)
        for k, (_, pins) in self.model.items():
            assert self.tier.holds(k), f"{k} (pins={pins}) vanished"

    def teardown(self) -> None:
        for k, v in list(self.model.items()):
            for _ in range(v[1]):
                self.tier.unpin(k)
        self.tier.clear()


class GpuLruMachine(LruMachine):
    """The same rules for the GPU tier (idle host tensors standing in for device buffers)."""

    def new_tier(self) -> LruTier[Any]:
        return GpuTier(CAPACITY)

    def new_value(self, key: str, nbytes: int) -> Any:
        t = torch.zeros(nbytes, dtype=torch.uint8)
        return GpuItem({0: t}, {0: t._version})

    def discard(self, value: Any) -> None:
        pass


_settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
TestDramLru = LruMachine.TestCase
TestDramLru.settings = _settings
TestGpuLru = GpuLruMachine.TestCase
TestGpuLru.settings = _settings
