"""What a Loader's tiers hold, and how a caller moves checkpoints in and out of them:
``prefetch``, ``evict``, ``cache_info`` (the methods of ``fastckpt.Loader`` call these)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FormatError
from fastckpt.format.reader import read_index
from fastckpt.loader import dramfill, facts, policy, remotesource
from fastckpt.loader.plan import plan_load
from fastckpt.loader.ssdconvert import ssd_key
from fastckpt.loader.target import resolve_target
from fastckpt.rules.urls import is_url, parse_url
from fastckpt.tiers.dram import DramTier

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.session import Loader


def prefetch(loader: Loader, path: str, tier: str, device: Any) -> bool:
    """Warm ``tier`` with the checkpoint at ``path`` (runs in the Loader's background pool)."""
    if tier == "gpu":
        tensors = loader.load(path, device)
        del tensors
        with loader.open_source(path, daemon=False) as opened:
            ident = opened.ident
        return any(k[:2] == ident for k in _tuple_keys(loader.gpu_tier.keys()))
    # warming the SSD tier makes its copy now (joining a conversion of it running here); a
    # DRAM-tier fill reads what a load would, and schedules the copy as a load does
    cfg = loader.config(ssd_convert="inline") if tier == "ssd" else loader.config()
    with loader.open_source(path, cfg=cfg, convert=tier == "ssd" or tier == "dram") as opened:
        if is_url(path):
            # written through to the SSD tier as it arrives; the DRAM tier reads it once whole
            kept = remotesource.wait_kept(loader.ssd_tier, opened)
            if tier == "ssd":
                return kept
            if opened.stream is not None and opened.stream.download is not None:
                opened.stream.download.wait()
        if tier == "ssd":
            if loader.ssd_tier is None:
                return False
            index = read_index(path)
            return ssd_key(loader.ssd_tier, index, path) is not None
        ident = opened.ident
        tier_obj = loader.dram_tier
        pinned = _wants_pinned(loader, device)
        if pinned:  # the first device stage gives the pool its pinning
            loader.stage(_first_device(device))
        if tier_obj.holds(ident):
            if pinned and tier_obj.pin(ident):  # held: make sure it is pinned for the device
                try:
                    item = tier_obj.peek(ident)
                    if item is not None:
                        dramfill.pin_item(item)
                finally:
                    tier_obj.unpin(ident)
            return True
        if sum(p.nbytes for p in opened.index.partitions) > tier_obj.capacity_bytes:
            return False
        plan = plan_load(opened.index, "cpu", chunk_bytes=cfg.ring_slot_bytes)
        residency, prof = facts.read_inputs(
            opened.index,
            plan,
            frozenset(),
            False,
            cfg,
            residency=loader._residency,
            engine=lambda: loader.engine(cfg),
        )
        item, _ = dramfill.fill(
            tier_obj,
            loader.flights,
            ident,
            opened.index,
            opened.files,
            engine=lambda: loader.engine(cfg),
            residency=lambda p: residency.get(p, 0.0),
            profile=prof,
            settings=policy.Settings(),
            cfg=cfg,
            pinned=pinned,
            open_partition=loader._open_partition,
            background=None,
        )
        if item is None:
            return tier_obj.holds(ident)
        if isinstance(item, dramfill.Unkept):
            tier_obj.discard(item)
            return False
        try:
            if pinned:
                dramfill.pin_item(item)  # already in the background: pin now
        finally:
            tier_obj.unpin(ident)
        return tier_obj.holds(ident)


def evict(loader: Loader, path: str | os.PathLike[str]) -> int:
    """Remove every version of the checkpoint at ``path`` from the GPU and DRAM tiers and its
    converted copy from the SSD tier, except what is in use; returns items removed."""
    if is_url(path):
        return _evict_url(loader, os.fspath(path))
    roots = {os.path.realpath(os.fspath(path))}
    index = None
    with contextlib.suppress(OSError, FormatError):
        index = read_index(path)
        roots.add(os.path.realpath(index.root))
    skey: str | None = None
    if loader.ssd_tier is not None and index is not None:
        with contextlib.suppress(OSError):
            skey = ssd_key(loader.ssd_tier, index, os.fspath(path))
        copy = loader.ssd_tier.peek(skey) if skey is not None else None
        if copy is not None:  # a load of a converted source left the copy's buffers in tiers
            roots.add(os.path.realpath(copy))
    removed = 0
    for tier in (loader.gpu_tier, loader.dram_tier):
        for key in _tuple_keys(tier.keys()):
            if key[0] in roots and tier.evict(key):
                removed += 1
    if skey is not None and loader.ssd_tier is not None and loader.ssd_tier.evict(skey):
        removed += 1
    return removed


def _evict_url(loader: Loader, url: str) -> int:
    """``evict`` of a remote checkpoint: its GPU and DRAM items and every SSD-tier entry
    recorded for the URL (as written: ``s3://bucket/key``)."""
    source = str(parse_url(url))
    removed = 0
    for tier in (loader.gpu_tier, loader.dram_tier):
        for key in _tuple_keys(tier.keys()):
            if key[0] == source and tier.evict(key):
                removed += 1
    if loader.ssd_tier is not None:
        for entry, _ in loader.ssd_tier.entries_from(source):
            loader.ssd_tier.adopt(entry)
            if loader.ssd_tier.evict(entry):
                removed += 1
    return removed


def cache_info(loader: Loader) -> dict[str, Any]:
    """Each tier's statistics and items, the pool, the staging ring and single-flight counts;
    the SSD tier's also its background conversions (``ssdconvert.Conversions.info``)."""
    loader.gpu_tier.sweep_modified()
    out: dict[str, Any] = {}
    for name, tier in (
        ("gpu", loader.gpu_tier),
        ("dram", loader.dram_tier),
        ("ssd", loader.ssd_tier),
    ):
        if tier is None:
            out[name] = None
            continue
        info = tier.stats().as_dict()
        if isinstance(tier, DramTier):
            info.update(tier.describe())
        if name == "ssd":  # copies being made are not items (``keys``) until published
            info["conversions"] = loader.conversions.info()
        info["keys"] = [
            {"key": list(k) if isinstance(k, tuple) else k, "nbytes": tier.size_of(k)}
            for k in tier.keys()  # noqa: SIM118 - a tier, not a dict
        ]
        out[name] = info
    out["pool"] = {
        "allocated_blocks": loader.pool.allocated,
        "reused_blocks": loader.pool.reused,
        "retained_bytes": loader.pool.retained_bytes,
    }
    out["single_flight"] = {
        "leaders": loader.flights.leaders,
        "followers": loader.flights.followers,
    }
    ring = loader.current_ring
    out["ring"] = (
        None
        if ring is None
        else {
            "slots": ring.total,
            "max_slots": ring.max_slots,
            "slot_bytes": ring.slot_bytes,
            "pin_method": ring.method,
            "pin_s": ring.pin_s,
        }
    )
    return out


def _first_device(device: Any) -> str:
    target = resolve_target(device)
    devices = target.values() if isinstance(target, dict) else [target]
    return next(d for d in devices if d != "cpu")


def _wants_pinned(loader: Loader, device: Any) -> bool:
    """Whether a DRAM-tier item for ``device`` should be pinned memory (a device is there)."""
    devices = device.values() if isinstance(device, dict) else [device]
    if not any(str(d).startswith("cuda") or isinstance(d, int) for d in devices):
        return False
    if loader.simulated_devices:
        return True
    import torch

    return bool(torch.cuda.is_available())


def _tuple_keys(keys: Iterable[Hashable]) -> list[tuple[Any, ...]]:
    return [k for k in keys if isinstance(k, tuple)]
