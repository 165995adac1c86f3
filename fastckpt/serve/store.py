"""The daemon's DRAM store: whole checkpoints in sealed memfds, LRU under a byte budget.

The store is the library's LRU core (``fastckpt.tiers.base.LruTier``: holds / get / put / evict /
pin / unpin, ``capacity_bytes``, ``used_bytes``, ``stats()``, ``keys()``) with the few things the
daemon needs on top. The rules are the core's:

- ``put`` reserves the bytes first (an item is put, pinned, before it is filled): room is made by
  evicting least recently used items that are not pinned; if the item is larger than the budget
  or the room is held by pinned items, nothing is evicted and ``put`` returns False (bypass);
- an item is in use while pinned (pins nest: one per client connection that was handed it, one
  while it is being loaded); pinned items are never evicted;
- ``used_bytes <= capacity_bytes`` after every operation;
- ``release`` of an item's memory (closing its memfds) happens outside the lock.

What the store adds: a ``release`` callback instead of a subclass hook, ``get(key, pin=True)``
(look up and pin in one step), ``unpin`` of an item dropped meanwhile is a no-op (a failed fill
drops the entry while connections still hold pins on it), ``unpin_value`` that undoes a pin of one
value and never of another put under the same key later, and a ``put`` of a key already held
leaves the LRU order alone.

Pure Python: no torch, no C++ core.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from fastckpt.tiers.base import LruTier

V = TypeVar("V")


class LruStore(LruTier[V]):
    _touch_held_on_put = False

    def __init__(
        self,
        capacity_bytes: int,
        release: Callable[[Hashable, V], None] | None = None,
        name: str = "dram",
    ) -> None:
        super().__init__(capacity_bytes, name=name)
        self._on_release = release

    def _release(self, key: Hashable, value: V) -> None:
        if self._on_release is not None:
            self._on_release(key, value)

    def get(self, key: Hashable, *, pin: bool = False) -> V | None:
        """The item (most recently used now, pinned when ``pin``), counting a hit; None and a
        miss when absent."""
        return self._get(key, pin=pin)

    def unpin(self, key: Hashable) -> None:
        """Undo one ``pin`` (a no-op for an item dropped meanwhile)."""
        with self._lock:
            if self.pins(key):
                super().unpin(key)

    def unpin_value(self, key: Hashable, value: V) -> None:
        """Undo one pin of ``value`` itself: a no-op when ``key`` holds nothing or another value
        now (the pinned one was dropped, say by a failed fill, and a new one was put under the
        same key: its pins belong to whoever pinned it)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item.value is value and item.pins:
                item.pins -= 1
