"""The SSD tier's side of a load: a converted local copy of a slower source, made on first use.

Whether a source is slow is the policy's rule (``policy.is_slow_source``: stock safetensors, a
network or FUSE filesystem). The copy is made once for concurrent callers (single flight) and
pinned in the tier while a load reads it.
"""

from __future__ import annotations

import os
import shutil

from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint
from fastckpt.loader import policy, profile
from fastckpt.loader.tiering import SingleFlight
from fastckpt.tiers.ssd import SsdTier, _du, source_identity


def through_ssd(
    tier: SsdTier, flights: SingleFlight, index: Index, source: str
) -> tuple[OpenCheckpoint | None, str | None]:
    """(the converted copy, opened; its key, pinned in the tier until the caller unpins it), or
    (None, None) when the source is not slow or no copy could be had."""
    try:
        _, fs_type = profile.fs_key(index.partitions[0].path) if index.partitions else ("", "")
    except OSError:
        return None, None
    if not policy.is_slow_source(index.kind, fs_type) or not index.partitions:
        return None, None
    files = [p.path for p in index.partitions]
    key = source_identity(files, source)
    converted = tier.get(key)
    if converted is None:

        def convert() -> bool:
            from fastckpt.format.convert import convert as _convert

            staged = tier.stage(key)
            try:
                _convert(source, staged, progress=False)
                tier.record_source(staged, os.path.realpath(source))
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return tier.put(key, staged, _du(staged))

        flights.run(("ssd", key), convert)
        converted = tier.peek(key)
    if converted is None or not tier.pin(key):
        return None, None
    try:
        return open_checkpoint(converted), key
    except BaseException:
        tier.unpin(key)
        raise


def ssd_key(index: Index, source: str) -> str:
    """The SSD tier's key of a source (for eviction)."""
    return source_identity([p.path for p in index.partitions], source)
