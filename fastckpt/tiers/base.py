"""The one interface every tier implements, and the LRU bookkeeping they share.

A tier maps keys (whole checkpoints, by identity) to items that occupy bytes. The rules, the same
for every tier:

- ``put`` makes room by evicting least recently used items that are not in use; an item larger
  than the tier's capacity, or one that cannot fit because what would have to go is in use, is
  not stored (``put`` returns False: the tier is bypassed, not thrashed);
- an item is in use while pinned (``pin``/``unpin`` nest) or while the tier says so
  (``_busy``: the GPU tier's buffers still referenced by a caller); it is never evicted;
- ``get`` counts a hit (and makes the item most recently used) or a miss;
- ``put`` of a key already held stores nothing (the first item stays) and makes that item most
  recently used, unless the class sets ``_touch_held_on_put = False``;
- ``used_bytes <= capacity_bytes`` after every operation.

Thread-safe: one lock per tier; ``_release`` (freeing an item's memory) runs outside it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class TierStats:
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
    dropped_modified: int = 0
    pinned_items: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tier(ABC, Generic[V]):
    """holds / get / put / evict / pin / unpin, capacity and used bytes, stats."""

    name: str = "tier"

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def holds(self, key: Hashable) -> bool: ...

    @abstractmethod
    def get(self, key: Hashable) -> V | None: ...

    @abstractmethod
    def put(self, key: Hashable, value: V, nbytes: int, *, pin: bool = False) -> bool:
        """Store ``value`` (``nbytes``) under ``key``, pinned at once when ``pin``; False when
        not stored (already held, larger than the tier, or no room outside items in use)."""

    @abstractmethod
    def evict(self, key: Hashable) -> bool: ...

    @abstractmethod
    def pin(self, key: Hashable) -> bool: ...

    @abstractmethod
    def unpin(self, key: Hashable) -> None: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    @abstractmethod
    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""


class _Item(Generic[V]):
    __slots__ = ("nbytes", "pins", "value")

    def __init__(self, value: V, nbytes: int) -> None:
        self.value = value
        self.nbytes = nbytes
        self.pins = 0


class LruTier(Tier[V]):
    """Whole-item LRU by bytes under a capacity. Subclasses free memory in ``_release`` and may
    report items in use in ``_busy``. The serve daemon's store (``fastckpt.serve.store``) is one
    too: this is the only LRU implementation in the package."""

    _touch_held_on_put = True

    def __init__(self, capacity_bytes: int, name: str = "tier") -> None:
        if capacity_bytes < 0:
            raise ValueError(f"{name} tier capacity {capacity_bytes} is negative")
        self.name = name
        self._capacity = capacity_bytes
        self._items: OrderedDict[Hashable, _Item[V]] = OrderedDict()
        self._used = 0
        self._lock = threading.RLock()
        self._hits = self._misses = self._in = self._out = 0
        self._evictions = self._bypasses = self._dropped = 0

    # ------------------------------------------------------------------ hooks
    def _release(self, key: Hashable, value: V) -> None:
        """Free an item's memory (called without the lock)."""

    def _busy(self, key: Hashable, value: V) -> bool:
        """Is the item in use for a reason the tier tracks itself (besides pins)?"""
        return False

    # ------------------------------------------------------------------ interface
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> V | None:
        return self._get(key, pin=False)

    def _get(self, key: Hashable, *, pin: bool) -> V | None:
        """``get``, and pinned in the same step when ``pin`` (nothing can evict in between)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            self._out += item.nbytes
            item.pins += int(pin)
            return item.value

    def put(self, key: Hashable, value: V, nbytes: int, *, pin: bool = False) -> bool:
        if nbytes < 0:
            raise ValueError(f"item size {nbytes} is negative")
        victims: list[tuple[Hashable, V]] = []
        try:
            with self._lock:
                if key in self._items:
                    # already held (another thread put it first): keep the existing item
                    if self._touch_held_on_put:
                        self._items.move_to_end(key)
                    return False
                if nbytes > self._capacity:
                    self._bypasses += 1
                    return False
                need = self._used + nbytes - self._capacity
                if need > 0:
                    chosen: list[Hashable] = []
                    freed = 0
                    for k, it in self._items.items():
                        if freed >= need:
                            break
                        if it.pins or self._busy(k, it.value):
                            continue
                        chosen.append(k)
                        freed += it.nbytes
                    if freed < need:
                        self._bypasses += 1
                        return False
                    for k in chosen:
                        victims.append((k, self._pop(k)))
                        self._evictions += 1
                item = _Item(value, nbytes)
                item.pins = int(pin)
                self._items[key] = item
                self._used += nbytes
                self._in += nbytes
                return True
        finally:
            for k, v in victims:
                self._release(k, v)

    def evict(self, key: Hashable) -> bool:
        """Remove ``key`` unless it is in use; True when removed."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item.pins or self._busy(key, item.value):
                return False
            value = self._pop(key)
            self._evictions += 1
        self._release(key, value)
        return True

    def drop(self, key: Hashable) -> bool:
        """Remove ``key`` because its bytes can no longer be trusted (not counted as an
        eviction); the caller guarantees nothing uses it."""
        with self._lock:
            if key not in self._items:
                return False
            value = self._pop(key)
            self._dropped += 1
        self._release(key, value)
        return True

    def pin(self, key: Hashable) -> bool:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return False
            item.pins += 1
            return True

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item.pins == 0:
                raise KeyError(f"{self.name} tier: {key!r} is not pinned")
            item.pins -= 1

    def pins(self, key: Hashable) -> int:
        """How many pins ``key`` holds (0 when absent)."""
        with self._lock:
            item = self._items.get(key)
            return 0 if item is None else item.pins

    def pinned(self, key: Hashable) -> bool:
        with self._lock:
            item = self._items.get(key)
            return item is not None and (item.pins > 0 or self._busy(key, item.value))

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def peek(self, key: Hashable) -> V | None:
        """The item without counting a hit or changing the LRU order."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item.value

    def size_of(self, key: Hashable) -> int:
        with self._lock:
            item = self._items.get(key)
            return 0 if item is None else item.nbytes

    def clear(self) -> int:
        """Evict everything not in use; returns how many items went."""
        return sum(1 for k in self.keys() if self.evict(k))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name,
                capacity_bytes=self._capacity,
                used_bytes=self._used,
                items=len(self._items),
                hits=self._hits,
                misses=self._misses,
                bytes_in=self._in,
                bytes_out=self._out,
                evictions=self._evictions,
                bypasses=self._bypasses,
                dropped_modified=self._dropped,
                pinned_items=sum(1 for it in self._items.values() if it.pins),
            )

    def _pop(self, key: Hashable) -> V:
        item = self._items.pop(key)
        self._used -= item.nbytes
        return item.value
