"""Where each buffer's bytes come from, and how: one pure decision, in one readable place.

Inputs are plain values (no torch, no ``_core``, no I/O): the load plan, the page-cache
residency of each partition, what the tiers hold for this checkpoint, the machine profile of the
filesystem, and a few settings. The output is one ``Decision`` per buffer. The executor carries the
decisions out, ``LoadStats`` reports them, and an estimator can call ``decide`` with made-up
inputs to predict a load: both see the same rule.

The rule, in order (first match wins):

1. an empty buffer needs nothing (``empty``);
2. the GPU tier holds this checkpoint's buffers for that device: revive them (``gpu-tier``);
3. the DRAM tier holds the checkpoint: CPU buffers map it copy-on-write, device buffers copy
   from it (``dram-tier``);
4. the DRAM tier is on and the checkpoint fits: read every partition once into the tier, then
   serve as 3 (``dram-fill``); not with ``verify`` (verification happens on the file path);
5. the partition is in the page cache: CPU buffers map it privately when at least
   ``mmap_min_resident`` is resident (``page-cache-map``), else a buffered read when at least
   ``buffered_min_resident`` is (``page-cache-read``);
6. otherwise read from storage in the read mode the profile measured fastest on this filesystem
   (``direct``, ``buffered`` or ``mixed``), unless the configuration forces one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastckpt.loader.plan import BufferPlan, LoadPlan

READ_MODES = ("direct", "buffered", "mixed")
SOURCES = (
    "empty",
    "gpu-tier",
    "dram-tier",
    "dram-fill",
    "page-cache-map",
    "page-cache-read",
    *READ_MODES,
)
# the tier (or place) each source's bytes come from, for LoadStats
TIER_OF = {
    "empty": "none",
    "gpu-tier": "gpu",
    "dram-tier": "dram",
    "dram-fill": "disk",
    "page-cache-map": "page-cache",
    "page-cache-read": "page-cache",
    "direct": "disk",
    "buffered": "disk",
    "mixed": "disk",
}
# In ``mixed`` mode, the first this fraction of each partition is read buffered, the rest O_DIRECT
# (two sequential streams in flight at once).
MIXED_BUFFERED_FRACTION = 0.5


@dataclass(frozen=True)
class ReadProfile:
    """What the read-mode probe measured on one filesystem (GB/s = 1e9 bytes per second).

    ``source`` says where the profile came from: ``probe`` (measured here), ``config`` (the
    ``read_mode`` setting forced it) or ``default`` (nothing measured: no probe allowed, or the
    file was already cached so a cold read could not be measured).
    """

    key: str
    fs_type: str
    direct_gbps: float = 0.0
    buffered_gbps: float = 0.0
    mixed_gbps: float = 0.0
    probe_bytes: int = 0
    measured_at: float = 0.0
    source: str = "default"

    @property
    def best(self) -> str:
        """The fastest measured mode; ``direct`` when nothing was measured. A mode must beat
        ``direct`` by 5% to be chosen, so noise does not flip the choice."""
        figures = {"direct": self.direct_gbps, "buffered": self.buffered_gbps}
        figures["mixed"] = self.mixed_gbps
        if not any(v > 0 for v in figures.values()):
            return "direct"
        base = figures["direct"] * 1.05
        best = max(figures, key=lambda m: figures[m])
        if best != "direct" and figures[best] <= base:
            return "direct"
        return best

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "fs_type": self.fs_type,
            "direct_gbps": self.direct_gbps,
            "buffered_gbps": self.buffered_gbps,
            "mixed_gbps": self.mixed_gbps,
            "probe_bytes": self.probe_bytes,
            "measured_at": self.measured_at,
            "source": self.source,
            "best": self.best,
        }


def read_mode(profile: ReadProfile | None, forced: str = "auto") -> str:
    """The read mode for cold bytes: the configured one, else the profile's best."""
    if forced != "auto":
        if forced not in READ_MODES:
            raise ValueError(f"read_mode={forced!r}: expected auto or one of {READ_MODES}")
        return forced
    return profile.best if profile is not None else "direct"


@dataclass(frozen=True)
class Holdings:
    """What the tiers hold for the checkpoint being loaded.

    ``gpu_devices``: devices for which the GPU tier holds buffers matching this plan.
    ``dram``: the DRAM tier holds the whole checkpoint. ``dram_can_fill``: the DRAM tier is on
    and the checkpoint fits its budget (so a miss should fill it).
    """

    gpu_devices: frozenset[str] = frozenset()
    dram: bool = False
    dram_can_fill: bool = False


@dataclass(frozen=True)
class Settings:
    mmap_min_resident: float = 0.95
    buffered_min_resident: float = 0.5
    cpu_map_cached: bool = True
    verify: bool = False
    read_mode: str = "auto"


@dataclass(frozen=True)
class Decision:
    """Buffer ``buffer`` (on ``device``) gets its bytes from ``source``; ``tier`` is where they
    live (``gpu``, ``dram``, ``page-cache``, ``disk``, ``none``)."""

    buffer: int
    device: str
    partition: int
    source: str
    tier: str = field(init=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown byte source {self.source!r}")
        object.__setattr__(self, "tier", TIER_OF[self.source])


def decide(
    plan: LoadPlan,
    *,
    residency: Mapping[int, float],
    holdings: Holdings = Holdings(),
    profile: ReadProfile | None = None,
    settings: Settings = Settings(),
) -> tuple[Decision, ...]:
    """One ``Decision`` per buffer of ``plan`` (in buffer order). ``residency`` maps a partition
    index to the fraction of it in the page cache (missing = 0)."""
    cold_mode = read_mode(profile, settings.read_mode)
    out: list[Decision] = []
    for b in plan.buffers:
        out.append(
            Decision(
                b.index, b.device, b.partition, _source(b, residency, holdings, cold_mode, settings)
            )
        )
    return tuple(out)


def _source(
    b: BufferPlan,
    residency: Mapping[int, float],
    holdings: Holdings,
    cold_mode: str,
    settings: Settings,
) -> str:
    if b.nbytes == 0:
        return "empty"
    if b.device != "cpu" and b.device in holdings.gpu_devices:
        return "gpu-tier"
    if holdings.dram:
        return "dram-tier"
    if holdings.dram_can_fill and not settings.verify:
        return "dram-fill"
    resident = residency.get(b.partition, 0.0)
    if (
        b.device == "cpu"
        and settings.cpu_map_cached
        and not settings.verify
        and resident >= settings.mmap_min_resident
    ):
        return "page-cache-map"
    if resident >= settings.buffered_min_resident:
        return "page-cache-read"
    return cold_mode


def mixed_split(file_start: int, file_end: int) -> int:
    """File offset where ``mixed`` mode switches from buffered to O_DIRECT reads for a partition
    range ``[file_start, file_end)`` (page aligned)."""
    cut = file_start + int((file_end - file_start) * MIXED_BUFFERED_FRACTION)
    return cut - cut % 4096


def summary(decisions: tuple[Decision, ...]) -> str:
    """Source names joined by ``+`` (sorted, without ``empty``): ``LoadStats.path_taken``."""
    names = sorted({d.source for d in decisions if d.source != "empty"})
    return "+".join(names) or "none"


def fill_mode(resident: float, profile: ReadProfile | None, settings: Settings = Settings()) -> str:
    """How a DRAM-tier fill reads a whole partition: buffered when it is mostly in the page cache,
    else the cold read mode."""
    if resident >= settings.buffered_min_resident:
        return "page-cache-read"
    return read_mode(profile, settings.read_mode)


# Filesystems whose reads go over a network (or through FUSE): a local converted copy is faster.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "glusterfs", "9p", "afs")


def is_slow_source(kind: str, fs_type: str) -> bool:
    """Should the SSD tier keep a converted copy of this source? Stock safetensors (converted on
    first use: aligned, checksummed) and anything on a network or FUSE filesystem."""
    return kind != "fastckpt" or fs_type in NETWORK_FS or fs_type.startswith("fuse")
