"""The DRAM tier: whole checkpoints in host memory (memfd blocks from the Loader's pool).

An item is one checkpoint: one ``HostBlock`` per partition holding the partition's bytes from
file offset 0. A CPU load from it maps the needed range privately (copy-on-write: a caller may
modify its tensors, the cached bytes stay as they were, and nothing is copied up front); a GPU
load copies from the block's shared mapping, pinned piece by piece on first use when a GPU is
present. Evicting an item returns its blocks to the pool; memory that callers still map stays
alive until they drop it (it is theirs then, and no longer counted by the tier).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from fastckpt.tiers.base import LruTier
from fastckpt.tiers.pool import HostBlock, HostPool


@dataclass
class DramItem:
    """Partition index -> block holding that partition's bytes (file offset = block offset)."""

    blocks: Mapping[int, HostBlock]
    nbytes: int


class DramTier(LruTier[DramItem]):
    def __init__(self, capacity_bytes: int, pool: HostPool) -> None:
        super().__init__(capacity_bytes, name="dram")
        self.pool = pool

    def _release(self, key: Hashable, value: DramItem) -> None:
        for block in value.blocks.values():
            self.pool.free(block)

    def new_item(self, sizes: Mapping[int, int]) -> DramItem:
        """Blocks for partitions of the given sizes (not yet in the tier: fill, then ``put``)."""
        blocks: dict[int, HostBlock] = {}
        try:
            for part, n in sizes.items():
                blocks[part] = self.pool.alloc(n)
        except BaseException:
            self.discard(DramItem(blocks, 0))
            raise
        return DramItem(blocks, sum(sizes.values()))

    def discard(self, item: DramItem) -> None:
        """Free an item that was never put (a failed fill, a bypass)."""
        for block in item.blocks.values():
            self.pool.free(block)
