"""The daemon's LRU store against a plain OrderedDict model, under random operations."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fastckpt.serve.store import LruStore

KEYS = st.sampled_from("abcdef")


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[str] = []
        self.store: LruStore[str] = LruStore(100, release=lambda k, v: self.released.append(v))
        self.model: OrderedDict[str, int] = OrderedDict()  # key -> size, LRU first
        self.pins: dict[str, int] = {}
        self.expected_released: list[str] = []

    @rule(key=KEYS, size=st.integers(0, 120), pin=st.booleans())
    def put(self, key: str, size: int, pin: bool) -> None:
        stored = self.store.put(key, f"v{key}", size, pin=pin)
        if key in self.model:
            assert not stored
            return
        need = sum(self.model.values()) + size - 100
        victims = []
        for k, n in self.model.items():
            if need <= 0:
                break
            if not self.pins.get(k):
                victims.append(k)
                need -= n
        if size > 100 or need > 0:
            assert not stored
            return
        assert stored
        for k in victims:
            self.expected_released.append(f"v{k}")
            del self.model[k]
            self.pins.pop(k, None)
        self.model[key] = size
        self.pins[key] = int(pin)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        value = self.store.get(key)
        assert (value is not None) == (key in self.model)
        if key in self.model:
            self.model.move_to_end(key)

    @rule(key=KEYS)
    def pin(self, key: str) -> None:
        assert self.store.pin(key) == (key in self.model)
        if key in self.model:
            self.pins[key] += 1

    @rule(key=KEYS)
    def unpin(self, key: str) -> None:
        self.store.unpin(key)
        if self.pins.get(key):
            self.pins[key] -= 1

    @rule(key=KEYS)
    def evict(self, key: str) -> None:
        removed = self.store.evict(key)
        assert removed == (key in self.model and not self.pins.get(key))
        if removed:
            self.expected_released.append(f"v{key}")
            del self.model[key]
            del self.pins[key]

    @invariant()
    def agrees(self) -> None:
        assert self.store.keys() == list(self.model)
        assert self.store.used_bytes == sum(self.model.values()) <= self.store.capacity_bytes
        for k in self.model:
            assert self.store.pins(k) == self.pins[k]
        assert self.released == self.expected_released  # freed exactly what was evicted


TestStore = StoreMachine.TestCase
TestStore.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_stats_count_hits_misses_bytes_and_evictions() -> None:
    store: LruStore[str] = LruStore(10)
    assert store.put("a", "A", 6) and store.get("a") == "A" and store.get("b") is None
    assert store.put("b", "B", 6)  # evicts a
    s = store.stats()
    assert (s.hits, s.misses, s.bytes_in, s.bytes_out, s.evictions, s.items) == (1, 1, 12, 6, 1, 1)
    assert store.pin("b") and not store.put("c", "C", 6) and store.stats().bypasses == 1
