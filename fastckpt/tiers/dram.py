"""The DRAM tier: whole checkpoints in host memory.

An item is one checkpoint: one block per partition holding the partition's bytes from file
offset 0. A block is either

- a ``HostBlock`` from the Loader's pool (a memfd, pinned piece by piece on first GPU use), used
  when a GPU load needs pinned memory, or when the page cache cannot be held; or
- a ``HeldFile`` (``fastckpt.tiers.held``): for CPU-only items, the partition's own page-cache
  pages, locked in memory through the validated descriptor; nothing is copied, and a CPU hit
  faults in as fast as a warm page-cache mapping.

A CPU load from either maps the needed range privately (copy-on-write: a caller may modify its
tensors, the cached bytes stay as they were, and nothing is copied up front); a GPU load copies
from the block. Evicting an item releases its blocks; memory that callers still map stays alive
until they drop it (it is theirs then, and no longer counted by the tier).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from fastckpt.tiers.base import LruTier
from fastckpt.tiers.held import HeldFile, PageLocker, lock_file_pages
from fastckpt.tiers.pool import HostBlock, HostPool


@dataclass
class DramItem:
    """Partition index -> block holding that partition's bytes (file offset = block offset)."""

    blocks: Mapping[int, HostBlock | HeldFile]
    nbytes: int

    @property
    def held(self) -> bool:
        """Whether the item keeps the files' page cache (not memfd copies)."""
        return any(isinstance(b, HeldFile) for b in self.blocks.values())


class DramTier(LruTier[DramItem]):
    """``page_locker`` locks a file's pages in memory (default ``mlock``; None: never hold page
    cache, always copy into memfd blocks); a seam for tests and for hosts that forbid locking."""

    def __init__(
        self,
        capacity_bytes: int,
        pool: HostPool,
        *,
        page_locker: PageLocker | None = lock_file_pages,
    ) -> None:
        super().__init__(capacity_bytes, name="dram")
        self.pool = pool
        self.page_locker = page_locker
        self.held_items = 0  # items made by holding page cache
        self.lock_failures = 0  # items that fell back to memfd copies because locking failed
        self.last_lock_error = ""

    def _free_block(self, block: HostBlock | HeldFile) -> None:
        if isinstance(block, HeldFile):
            block.close()
        else:
            self.pool.free(block)

    def _release(self, key: Hashable, value: DramItem) -> None:
        for block in value.blocks.values():
            self._free_block(block)

    def new_item(self, sizes: Mapping[int, int]) -> DramItem:
        """Blocks for partitions of the given sizes (not yet in the tier: fill, then ``put``)."""
        blocks: dict[int, HostBlock | HeldFile] = {}
        try:
            for part, n in sizes.items():
                blocks[part] = self.pool.alloc(n)
        except BaseException:
            self.discard(DramItem(blocks, 0))
            raise
        return DramItem(blocks, sum(sizes.values()))

    def hold_files(self, files: Mapping[int, tuple[int, int]]) -> DramItem | None:
        """An item holding the page cache of partitions given as ``{partition: (fd, nbytes)}``;
        takes ownership of every fd (closed on failure). None when holding is off or locking
        failed (``lock_failures`` and ``last_lock_error`` say why): copy into memfds instead."""
        if self.page_locker is None:
            for fd, _ in files.values():
                os.close(fd)
            return None
        blocks: dict[int, HostBlock | HeldFile] = {}
        pending = dict(files)
        try:
            for part, (fd, n) in files.items():
                blocks[part] = HeldFile(fd, n, self.page_locker)
                del pending[part]
        except OSError as exc:
            self.discard(DramItem(blocks, 0))
            for fd, _ in pending.values():
                os.close(fd)
            self.lock_failures += 1
            self.last_lock_error = str(exc)
            return None
        except BaseException:
            self.discard(DramItem(blocks, 0))
            for fd, _ in pending.values():
                os.close(fd)
            raise
        self.held_items += 1
        return DramItem(blocks, sum(n for _, n in files.values()))

    def discard(self, item: DramItem) -> None:
        """Free an item that was never put (a failed fill, a bypass)."""
        for block in item.blocks.values():
            self._free_block(block)

    def describe(self) -> dict[str, Any]:
        """How the tier keeps its items (for ``cache_info``)."""
        return {
            "held_items": self.held_items,
            "lock_failures": self.lock_failures,
            "last_lock_error": self.last_lock_error,
        }
