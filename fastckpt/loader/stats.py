"""Per-load statistics: what was moved, how, and where the time went."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadStats:
    """What one ``fastckpt.load`` did.

    Times are wall-clock seconds. Stages overlap in the pipeline, so they need not add up to
    ``seconds``: ``read_wait_s`` is time the loader waited for reads, ``copy_wait_s`` time it
    waited for host-to-device copies to free a staging slot, ``verify_s`` time spent computing
    checksums (0 unless ``verify=True``), ``ring_s`` time to get the pinned staging ring (only a
    process's first GPU load pins it), ``finalize_s`` time waiting for the last copies and making
    the tensor views. ``path_taken`` names the policy's byte sources (``+``-joined); the
    per-buffer decisions are in ``decisions``.
    """

    path: str
    kind: str
    devices: tuple[str, ...]
    nbytes: int
    read_nbytes: int
    tensors: int
    buffers: int
    seconds: float
    plan_s: float
    alloc_s: float
    read_wait_s: float
    copy_wait_s: float
    verify_s: float
    ring_s: float
    finalize_s: float
    engine: str
    path_taken: str
    verified_chunks: int = 0
    # (buffer, device, source, tier) per buffer: the policy's decision and where the bytes lived
    decisions: tuple[tuple[int, str, str, str], ...] = ()
    # bytes of buffers served per tier ("gpu", "dram", "page-cache", "disk", "none")
    tier_nbytes: dict[str, int] = field(default_factory=dict)
    # single flight of a DRAM-tier fill: "leader" (read the bytes), "follower" (waited for a
    # concurrent load's read), "" (no fill)
    flight: str = ""
    # the read-mode profile the policy used for cold bytes (what the probe measured), if any
    read_profile: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # host-to-device copies issued, and the most that were in flight at once (device loads)
    copies: int = 0
    max_copies_in_flight: int = 0

    @property
    def gbps(self) -> float:
        """Tensor bytes delivered per second (GB = 1e9 bytes)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gbps"] = self.gbps
        return out

    def __str__(self) -> str:
        # engine "none": no byte was read (mapped from the page cache, or served by a tier)
        reads = "no reads" if self.engine == "none" else f"reads on {self.engine}"
        return (
            f"loaded {self.tensors} tensors, {self.nbytes / 1e9:.3f} GB to "
            f"{', '.join(self.devices)} in {self.seconds:.3f} s ({self.gbps:.2f} GB/s) "
            f"via {self.path_taken} ({reads})"
        )


_last = threading.local()
_last_global: list[LoadStats | None] = [None]


def record(stats: LoadStats) -> None:
    _last.value = stats
    _last_global[0] = stats


def last_stats() -> LoadStats | None:
    """Statistics of the most recent load finished in this thread (else in the process)."""
    value = getattr(_last, "value", None)
    return value if value is not None else _last_global[0]


def assemble(
    *,
    index: Any,
    plan: Any,
    decision: Any,
    executor: Any,
    tensors: int,
    t_start: float,
    t_plan: float,
    t_end: float,
    flight: str = "",
    profile: Any = None,
    notes: set[str] | None = None,
) -> LoadStats:
    """The ``LoadStats`` of a finished load, from its plan, the policy's decision and what the
    executor measured."""
    from fastckpt.loader.policy import summary

    timings = executor.timings
    by_tier: dict[str, int] = {}
    for d in decision:
        by_tier[d.tier] = by_tier.get(d.tier, 0) + plan.buffers[d.buffer].nbytes
    return LoadStats(
        path=index.root,
        kind=index.kind,
        devices=plan.devices,
        nbytes=plan.tensor_nbytes,
        read_nbytes=plan.read_nbytes,
        tensors=tensors,
        buffers=len(plan.buffers),
        seconds=t_end - t_start,
        plan_s=t_plan - t_start,
        alloc_s=timings.alloc_s,
        read_wait_s=timings.read_wait_s,
        copy_wait_s=timings.copy_wait_s,
        verify_s=timings.verify_s,
        ring_s=timings.ring_s,
        finalize_s=timings.finalize_s + executor.views_s,
        engine=executor.engine_name,
        path_taken=summary(decision),
        verified_chunks=executor.verifier.checked if executor.verifier else 0,
        decisions=tuple((d.buffer, d.device, d.source.value, d.tier) for d in decision),
        tier_nbytes=by_tier,
        flight=flight,
        read_profile=profile.as_dict() if profile is not None else None,
        notes=tuple(sorted(timings.notes | (notes or set()))),
        copies=timings.copies,
        max_copies_in_flight=timings.max_copies_in_flight,
    )


def combine(parts: Sequence[LoadStats], *, seconds: float | None = None) -> LoadStats:
    """One ``LoadStats`` for loads that together make one (the windows of a stream): bytes,
    tensors, buffers, copies and stage times added, sources and tiers joined; ``seconds`` is the
    wall time when given (windows overlap), else the sum."""
    if not parts:
        raise ValueError("no loads to combine")
    first = parts[0]

    def total(name: str) -> Any:
        return sum(getattr(p, name) for p in parts)

    tiers: dict[str, int] = {}
    for p in parts:
        for k, v in p.tier_nbytes.items():
            tiers[k] = tiers.get(k, 0) + v
    taken = sorted({s for p in parts for s in p.path_taken.split("+") if s and s != "none"})
    decisions = tuple(d for p in parts for d in p.decisions)
    return LoadStats(
        path=first.path,
        kind=first.kind,
        devices=tuple(sorted({d for p in parts for d in p.devices})),
        nbytes=total("nbytes"),
        read_nbytes=total("read_nbytes"),
        tensors=total("tensors"),
        buffers=total("buffers"),
        seconds=total("seconds") if seconds is None else seconds,
        plan_s=total("plan_s"),
        alloc_s=total("alloc_s"),
        read_wait_s=total("read_wait_s"),
        copy_wait_s=total("copy_wait_s"),
        verify_s=total("verify_s"),
        ring_s=total("ring_s"),
        finalize_s=total("finalize_s"),
        engine="+".join(sorted({p.engine for p in parts})),
        path_taken="+".join(taken) or "none",
        verified_chunks=total("verified_chunks"),
        decisions=decisions,
        tier_nbytes=tiers,
        notes=tuple(sorted({n for p in parts for n in p.notes})),
        copies=total("copies"),
        max_copies_in_flight=max(p.max_copies_in_flight for p in parts),
    )
