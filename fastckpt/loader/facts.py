"""What the policy is told before it decides: the pieces ``Loader.execute`` gathers.

- ``PlanCache``: the pure plan, remembered for the very same ``Index`` object;
- ``revive``: the GPU tier's idle buffers of this very plan;
- ``read_inputs``: page-cache residency of the partitions the policy may read, and the
  read-mode profile when some of them are cold;
- ``sampled_residency``: the default residency probe (sampled ``mincore``/``cachestat``).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.format.index import Index
from fastckpt.loader import policy, profile
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.tiering import plan_signature
from fastckpt.tiers.gpu import GpuTier

# Windows sampled to estimate residency: an exact count costs ~4 ms per GiB, a sample ~0.1 ms.
RESIDENCY_SAMPLES = 256
PLANS_KEPT = 32  # plans remembered per Loader (a GPU-tier hit then makes views, little else)


def sampled_residency(path: str) -> float:
    """The fraction of ``path`` in the page cache, sampled (0.0 when it cannot be read)."""
    try:
        return io_engine.residency(path, sample_windows=RESIDENCY_SAMPLES)
    except OSError:
        return 0.0


class PlanCache:
    """``plan_load``, remembered for the very same ``Index`` object (a checkpoint loaded again
    gets the same object from the reader while its index bytes are unchanged), at most
    ``kept`` plans, least recently used first out."""

    def __init__(self, kept: int = PLANS_KEPT) -> None:
        self._kept = kept
        self._lock = threading.Lock()
        self._plans: OrderedDict[Hashable, tuple[weakref.ref[Index], LoadPlan]] = OrderedDict()

    def get(
        self,
        index: Index,
        target: Any,
        names: Iterable[str] | None,
        chunk_bytes: int,
        verify: bool,
    ) -> LoadPlan:
        names_key = None if names is None else tuple(names)
        target_key = tuple(sorted(target.items())) if isinstance(target, Mapping) else target
        key = (id(index), target_key, names_key, chunk_bytes, verify)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0]() is index:
                self._plans.move_to_end(key)
                return hit[1]
        plan = plan_load(
            index,
            dict(target) if isinstance(target, Mapping) else target,
            names=names_key,
            chunk_bytes=chunk_bytes,
            verify=verify,
        )
        with self._lock:
            self._plans[key] = (weakref.ref(index), plan)
            while len(self._plans) > self._kept:
                self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)


def revive(
    gpu_tier: GpuTier, ident: tuple[str, str], plan: LoadPlan, held: list[tuple[Any, Hashable]]
) -> tuple[dict[int, Any], dict[str, Hashable]]:
    """GPU tier: idle buffers of this very plan, revived (pinned in the tier, and recorded in
    ``held``, until the load ends). Returns them by buffer index, and each device's tier key."""
    revived: dict[int, Any] = {}
    keys: dict[str, Hashable] = {}
    if gpu_tier.capacity_bytes == 0:
        return revived, keys
    for dev in plan.devices:
        if dev == "cpu":
            continue
        keys[dev] = key = (*ident, dev, plan_signature(plan, dev))
        item = gpu_tier.revive(key)
        if item is not None:
            held.append((gpu_tier, key))
            revived.update(item.buffers)
    return revived, keys


def read_inputs(
    index: Index,
    plan: LoadPlan,
    gpu_devices: frozenset[str],
    dram: bool,
    cfg: Config,
    *,
    residency: Callable[[str], float],
    engine: Callable[[], io_engine.Engine],
) -> tuple[dict[int, float], policy.ReadProfile | None]:
    """Residency of the partitions the policy may read (none when the DRAM tier serves the
    load), and the read-mode profile when some of them are cold."""
    if dram:
        return {}, None
    parts = sorted(
        {
            b.partition
            for b in plan.buffers
            if b.nbytes and not (b.device != "cpu" and b.device in gpu_devices)
        }
    )
    fractions = {p: residency(index.partitions[p].path) for p in parts}
    cold = [p for p in parts if fractions[p] < policy.Settings().buffered_min_resident]
    prof = None
    if cold and cfg.read_mode == "auto":
        largest = max(cold, key=lambda p: index.partitions[p].nbytes)
        prof = profile.profile_for(index.partitions[largest].path, cfg, engine())
    return fractions, prof


def read_gbps(
    index: Index,
    daemon: bool,
    cfg: Config,
    residency: Callable[[str], float],
    engine: Callable[[], Any],
) -> float:
    """The rate a read of the checkpoint can expect now (``policy.read_gbps``): the page
    cache's when its partitions are resident (or the daemon serves them), else what the read
    profile measured for the cold mode. Used to choose how a column shard is read."""
    parts = index.partitions
    if daemon or not parts:
        return policy.PAGE_CACHE_GBPS
    resident = min(residency(p.path) for p in parts)
    prof = None
    if resident < policy.Settings().buffered_min_resident and cfg.read_mode == "auto":
        largest = max(parts, key=lambda p: p.nbytes)
        prof = profile.profile_for(largest.path, cfg, engine())
    return policy.read_gbps(prof, resident)


def buffers_on(plan: LoadPlan, device: str) -> list[Any]:
    """The plan's buffers on ``device``."""
    return [b for b in plan.buffers if b.device == device]


__all__ = [
    "PLANS_KEPT",
    "RESIDENCY_SAMPLES",
    "PlanCache",
    "buffers_on",
    "read_gbps",
    "read_inputs",
    "revive",
    "sampled_residency",
]
