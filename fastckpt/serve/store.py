"""The daemon's DRAM store: whole checkpoints in sealed memfds, LRU under a byte budget.

The interface mirrors the tiers interface of ``fastckpt.tiers`` (holds / get / put / evict / pin /
unpin, ``capacity_bytes``, ``used_bytes``, ``stats()``, ``keys()``), so the daemon can move onto
the library's DRAM tier without changing its callers. Rules:

- ``put`` reserves the bytes first (an item is put, pinned, before it is filled): room is made by
  evicting least recently used items that are not pinned; if the item is larger than the budget
  or the room is held by pinned items, nothing is evicted and ``put`` returns False (bypass);
- an item is in use while pinned (pins nest: one per client connection that was handed it, one
  while it is being loaded); pinned items are never evicted;
- ``used_bytes <= capacity_bytes`` after every operation;
- ``release`` of an item's memory (closing its memfds) happens outside the lock.

Pure Python: no torch, no C++ core.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class StoreStats:
    """Same field names as ``fastckpt.tiers.TierStats``."""

    name: str
    capacity_bytes: int
    used_bytes: int
    items: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int
    bypasses: int
    pinned_items: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Slot(Generic[V]):
    __slots__ = ("nbytes", "pins", "value")

    def __init__(self, value: V, nbytes: int, pins: int) -> None:
        self.value = value
        self.nbytes = nbytes
        self.pins = pins


class LruStore(Generic[V]):
    def __init__(
        self,
        capacity_bytes: int,
        release: Callable[[Hashable, V], None] | None = None,
        name: str = "dram",
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"store capacity {capacity_bytes} is negative")
        self.name = name
        self._capacity = capacity_bytes
        self._release = release or (lambda k, v: None)
        self._slots: OrderedDict[Hashable, _Slot[V]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._in = self._out = self._evictions = self._bypasses = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._slots

    def get(self, key: Hashable, *, pin: bool = False) -> V | None:
        """The item (most recently used now, pinned when ``pin``), counting a hit; None and a
        miss when absent."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                self._misses += 1
                return None
            self._slots.move_to_end(key)
            self._hits += 1
            self._out += slot.nbytes
            slot.pins += int(pin)
            return slot.value

    def put(self, key: Hashable, value: V, nbytes: int, *, pin: bool = False) -> bool:
        if nbytes < 0:
            raise ValueError(f"item size {nbytes} is negative")
        gone: list[tuple[Hashable, V]] = []
        try:
            with self._lock:
                if key in self._slots:
                    return False
                if nbytes > self._capacity:
                    self._bypasses += 1
                    return False
                excess = self._used + nbytes - self._capacity
                victims: list[Hashable] = []
                for k, slot in self._slots.items():
                    if excess <= 0:
                        break
                    if slot.pins == 0:
                        victims.append(k)
                        excess -= slot.nbytes
                if excess > 0:
                    self._bypasses += 1
                    return False
                for k in victims:
                    gone.append((k, self._remove(k)))
                    self._evictions += 1
                self._slots[key] = _Slot(value, nbytes, int(pin))
                self._used += nbytes
                self._in += nbytes
                return True
        finally:
            for k, v in gone:
                self._release(k, v)

    def evict(self, key: Hashable) -> bool:
        """Remove ``key`` unless it is pinned; True when removed."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.pins:
                return False
            value = self._remove(key)
            self._evictions += 1
        self._release(key, value)
        return True

    def drop(self, key: Hashable) -> bool:
        """Remove ``key`` whatever its pins (a failed fill; pins held on it become no-ops)."""
        with self._lock:
            if key not in self._slots:
                return False
            value = self._remove(key)
        self._release(key, value)
        return True

    def pin(self, key: Hashable) -> bool:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return False
            slot.pins += 1
            return True

    def unpin(self, key: Hashable) -> None:
        """Undo one ``pin`` (a no-op for an item dropped meanwhile)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.pins > 0:
                slot.pins -= 1

    def pins(self, key: Hashable) -> int:
        with self._lock:
            slot = self._slots.get(key)
            return 0 if slot is None else slot.pins

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._slots)

    def peek(self, key: Hashable) -> V | None:
        with self._lock:
            slot = self._slots.get(key)
            return None if slot is None else slot.value

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                name=self.name,
                capacity_bytes=self._capacity,
                used_bytes=self._used,
                items=len(self._slots),
                hits=self._hits,
                misses=self._misses,
                bytes_in=self._in,
                bytes_out=self._out,
                evictions=self._evictions,
                bypasses=self._bypasses,
                pinned_items=sum(1 for s in self._slots.values() if s.pins),
            )

    def _remove(self, key: Hashable) -> V:
        slot = self._slots.pop(key)
        self._used -= slot.nbytes
        return slot.value
