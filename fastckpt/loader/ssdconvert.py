"""The SSD tier's side of a load: a converted local copy of a slower source, made on first use.

Whether a source is slow is the policy's rule (``policy.is_slow_source``: stock safetensors, a
network or FUSE filesystem). Everything else is the tier's (``SsdTier.open_copy``): keying by
content, one conversion for concurrent callers, checking a copy before it is used, dropping and
rebuilding one that fails a check, falling back to the source on a full disk.
"""

from __future__ import annotations

from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint
from fastckpt.loader import policy, profile
from fastckpt.tiers.ssd import SsdTier, source_files


def through_ssd(
    tier: SsdTier, index: Index, source: str
) -> tuple[OpenCheckpoint | None, str | None]:
    """(the converted copy, opened; its key, pinned in the tier until the caller unpins it), or
    (None, None) when the source is not slow or no copy could be had."""
    try:
        _, fs_type = profile.fs_key(index.partitions[0].path) if index.partitions else ("", "")
    except OSError:
        return None, None
    if not policy.is_slow_source(index.kind, fs_type) or not index.partitions:
        return None, None
    got = tier.open_copy(source_files(index), source)
    return (None, None) if got is None else got


def ssd_key(tier: SsdTier, index: Index, source: str) -> str | None:
    """The key of the copy the tier holds for this source as it is now (None: none known)."""
    return tier.key_of(source_files(index), source)
