"""The GPU tier: device buffers of loaded checkpoints, revived when their tensors were dropped.

After a load, the Loader offers the load's device buffers (one uint8 tensor per partition and
device) to the tier. While the caller holds any tensor made from them, the item is in use: the
tier only watches (the storage's reference count says when the last view is gone). Once the caller
dropped every tensor, the item is idle: a later load of the same checkpoint with the same plan
revives the buffers and makes fresh views of them (no copy), or the tier frees it when its budget
or an allocation failure needs the memory.

Never handing back changed bytes: views share the buffer's version counter, which torch bumps on
every in-place operation (``t.add_(1)``, ``t[0] = 5``, ``t.copy_(x)``, optimizer steps). An idle
item whose counter moved since the load is dropped, not revived.

What cannot be detected: writes that bypass torch's version counter, i.e. through ``t.data``
(``t.data.add_(1)``), through raw pointers (custom CUDA kernels, ``data_ptr()`` handed to C code,
CUDA IPC), or through another framework after a DLPack export. A caller who does that must not use
the GPU tier (``gpu_tier_bytes=0``, the default) or must ``Loader.evict`` the checkpoint.

The tier logic does not depend on the device kind; tests run it on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastckpt.tiers.base import LruTier


def _storage_refs(t: Any) -> int:
    """How many tensors share ``t``'s storage, ``t`` included (-1 when torch cannot say)."""
    import torch

    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return -1
    storage = t.untyped_storage()
    # ``storage`` itself is one more handle on the storage while this function runs
    return int(counter(storage._cdata)) - 1


@dataclass
class GpuItem:
    """Buffer index -> device tensor (uint8), and each buffer's version counter when offered."""

    buffers: Mapping[int, Any]
    versions: dict[int, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) for t in self.buffers.values())


class GpuTier(LruTier[GpuItem]):
    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes, name="gpu")

    def _busy(self, key: Hashable, value: GpuItem) -> bool:
        for t in value.buffers.values():
            refs = _storage_refs(t)
            if refs < 0 or refs > 1:
                return True  # the caller still holds views (or torch cannot tell: assume so)
        return False

    def _modified(self, value: GpuItem) -> bool:
        return any(t._version != value.versions.get(i) for i, t in value.buffers.items())

    def offer(self, key: Hashable, buffers: Mapping[int, Any]) -> bool:
        """Track a finished load's device buffers; True when the tier keeps them."""
        item = GpuItem(dict(buffers), {i: int(t._version) for i, t in buffers.items()})
        return self.put(key, item, item.nbytes)

    def revive(self, key: Hashable) -> GpuItem | None:
        """The idle, unmodified buffers of ``key``, pinned for the caller (``unpin`` once views
        exist); None when absent, still in use, or modified (then dropped)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item.pins or self._busy(key, item.value):
                self._misses += 1
                return None
            if self._modified(item.value):
                modified = True
            else:
                modified = False
                item.pins += 1
                self._items.move_to_end(key)
                self._hits += 1
                self._out += item.nbytes
                return item.value
        if modified:
            self.drop(key)
            with self._lock:
                self._misses += 1
        return None

    def sweep_modified(self) -> int:
        """Drop idle items whose bytes changed; returns how many."""
        gone = 0
        for key in self.keys():
            with self._lock:
                item = self._items.get(key)
                bad = (
                    item is not None
                    and not item.pins
                    and not self._busy(key, item.value)
                    and self._modified(item.value)
                )
            if bad and self.drop(key):
                gone += 1
        return gone

    def free_idle(self, device: str | None = None) -> int:
        """Evict every idle item (on ``device`` if given); returns bytes freed. Called when a
        device allocation fails."""
        freed = 0
        for key in self.keys():
            item = self.peek(key)
            if item is None:
                continue
            if device is not None and not any(
                str(t.device) == device for t in item.buffers.values()
            ):
                continue
            n = self.size_of(key)
            if self.evict(key):
                freed += n
        return freed
