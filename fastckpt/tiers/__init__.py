"""Tiers that keep checkpoints close to where they are loaded: GPU, DRAM and SSD.

Every tier implements one small interface (``fastckpt.tiers.base.Tier``): holds / get / put /
evict / pin / unpin, capacity and used bytes, and statistics (hits, misses, bytes in and out,
evictions). A ``fastckpt.Loader`` owns one of each; see docs/tiers.md. Importing this package
imports neither torch nor the C++ core.
"""

from __future__ import annotations

from fastckpt.tiers.base import LruTier, Tier, TierStats
from fastckpt.tiers.dram import DramItem, DramTier
from fastckpt.tiers.gpu import GpuItem, GpuTier
from fastckpt.tiers.held import HeldFile, lock_file_pages
from fastckpt.tiers.pool import HostBlock, HostPool
from fastckpt.tiers.ssd import SsdTier

__all__ = [
    "DramItem",
    "DramTier",
    "GpuItem",
    "GpuTier",
    "HeldFile",
    "HostBlock",
    "HostPool",
    "LruTier",
    "SsdTier",
    "Tier",
    "TierStats",
    "lock_file_pages",
]
