"""Where each buffer's bytes come from, and how: one pure decision, in one readable place.

Inputs are plain values (no torch, no ``_core``, no I/O): the load plan and the ``Facts`` about
the checkpoint right now (page-cache residency of each partition, what the tiers and the cache
daemon hold, the machine profile of the filesystem) plus a few settings. The output is one
``LoadDecision``: a ``Decision`` per buffer, with a typed byte ``Source``, and the tier action the
load carries out (fill the DRAM tier). ``decide`` runs once per load; the executor carries the
decision out, ``LoadStats`` reports it, and an estimator can call ``decide`` with made-up facts to
predict a load: both see the same rule.

The rule, per buffer, in order (first match wins):

1. an empty buffer needs nothing (``empty``);
2. the GPU tier holds this checkpoint's buffers for that device: revive them (``gpu-tier``);
3. the DRAM tier holds the checkpoint: CPU buffers map it copy-on-write, device buffers copy from
   it (``dram-tier``); not with ``verify`` (verification reads bytes it can check);
4. the machine's cache daemon handed over its sealed copies: CPU buffers map them copy-on-write,
   device buffers are read from them through the pinned ring (``daemon``); with ``verify`` every
   chunk of those bytes is checked (they are sealed, so what was checked is what is used);
5. the DRAM tier is on, may be filled by this load, and the checkpoint fits: read every partition
   once into the tier, then serve as 3 (action ``FILL``); not with ``verify``. The decision keeps
   the source it would have had otherwise (``fallback``) for a load that finds the tier could not
   keep the item;
6. the partition is in the page cache: CPU buffers map it privately when at least
   ``mmap_min_resident`` is resident (``page-cache-map``), else a buffered read when at least
   ``buffered_min_resident`` is (``page-cache-read``);
7. the checkpoint is streaming in from an object store (``s3://``, ``https://``) into local files:
   every buffer reads from them as its ranges arrive (``stream``; each read waits on the range
   gate of its file), CPU buffers as private mappings of the landed bytes where CPU loads may
   map (``stream-map``: mapped once the buffer's whole range has arrived, no copy);
8. otherwise it is read from storage in the mode the profile measured fastest on this filesystem:
   ``direct``, ``buffered``, ``mixed``, or, for CPU buffers, ``map`` (a private mapping whose page
   faults read ahead, as safetensors does) where mapping measured fastest; the configuration may
   force a mode.

A buffer that is not laid out like the file (``BufferPlan.mappable`` False: packed runs of a
shard, a caller's own memory) is never mapped: rules 3, 4 and 6 read it, and rule 7 takes the
mode of a device buffer.

How a column shard is read (its runs, or the whole span they lie in) is ``gather_runs``: the
cheaper of the two by the read rate the profile measured (or the page cache's) and a fixed cost
per read.

No source makes a pageable host-to-device copy: every byte bound for a device is read into the
pinned staging ring or copied from memory the DRAM tier pinned.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from fastckpt.loader.plan import BufferPlan, LoadPlan

READ_MODES = ("direct", "buffered", "mixed")
COLD_MODES = (*READ_MODES, "map")
# In ``mixed`` mode, the first this fraction of each partition is read buffered, the rest O_DIRECT
# (two sequential streams in flight at once).
MIXED_BUFFERED_FRACTION = 0.5


class Source(enum.Enum):
    """A byte source the policy can choose, with what the executor needs to know of it."""

    EMPTY = "empty"
    GPU_TIER = "gpu-tier"
    DRAM_TIER = "dram-tier"
    DAEMON = "daemon"
    PAGE_CACHE_MAP = "page-cache-map"
    PAGE_CACHE_READ = "page-cache-read"
    MAP = "map"
    DIRECT = "direct"
    BUFFERED = "buffered"
    MIXED = "mixed"
    STREAM = "stream"
    STREAM_MAP = "stream-map"

    def __str__(self) -> str:
        return self.value

    @property
    def tier(self) -> str:
        """Where the bytes live: ``gpu``, ``dram``, ``daemon``, ``page-cache``, ``disk``,
        ``remote`` (arriving from an object store), ``none``."""
        return _TIER[self]

    @property
    def from_files(self) -> bool:
        """Read (or mapped) through the checkpoint's validated descriptors."""
        return self in _FILE_SOURCES

    @property
    def maps_on_cpu(self) -> bool:
        """A CPU buffer from this source is a private mapping (copy-on-write), not a copy."""
        return self in (
            Source.DRAM_TIER,
            Source.DAEMON,
            Source.PAGE_CACHE_MAP,
            Source.MAP,
            Source.STREAM_MAP,
        )

    @property
    def streams(self) -> bool:
        """Reads of this source wait for their bytes to arrive (an object store's download)."""
        return self in (Source.STREAM, Source.STREAM_MAP)

    def direct_at(self, partition_range: tuple[int, int], file_offset: int) -> bool:
        """Whether a read at ``file_offset`` uses O_DIRECT under this source."""
        if self is Source.DIRECT:
            return True
        if self is Source.MIXED:
            return file_offset >= mixed_split(*partition_range)
        return False


_TIER = {
    Source.EMPTY: "none",
    Source.GPU_TIER: "gpu",
    Source.DRAM_TIER: "dram",
    Source.DAEMON: "daemon",
    Source.PAGE_CACHE_MAP: "page-cache",
    Source.PAGE_CACHE_READ: "page-cache",
    Source.MAP: "disk",
    Source.DIRECT: "disk",
    Source.BUFFERED: "disk",
    Source.MIXED: "disk",
    Source.STREAM: "remote",
    Source.STREAM_MAP: "remote",
}
_FILE_SOURCES = frozenset(
    {
        Source.PAGE_CACHE_MAP,
        Source.PAGE_CACHE_READ,
        Source.MAP,
        Source.DIRECT,
        Source.BUFFERED,
        Source.MIXED,
        Source.STREAM,
        Source.STREAM_MAP,
    }
)
SOURCES = tuple(s.value for s in Source)


class DramAction(enum.Enum):
    """What the load does with the DRAM tier: nothing, serve from its item, or fill it first."""

    NONE = "none"
    USE = "use"
    FILL = "fill"


@dataclass(frozen=True)
class ReadProfile:
    """What the read-mode probe measured on one filesystem (GB/s = 1e9 bytes per second).

    ``map_gbps`` is a private mapping's first full touch (page faults with readahead), measured
    where the probe could. ``source`` says where the profile came from: ``probe`` (measured
    here), ``config`` (the ``read_mode`` setting forced it) or ``default`` (nothing measured).
    """

    key: str
    fs_type: str
    direct_gbps: float = 0.0
    buffered_gbps: float = 0.0
    mixed_gbps: float = 0.0
    probe_bytes: int = 0
    measured_at: float = 0.0
    source: str = "default"
    map_gbps: float = 0.0

    @property
    def best(self) -> str:
        """The fastest measured read mode (``direct``, ``buffered``, ``mixed``); ``direct`` when
        nothing was measured. A mode must beat ``direct`` by 5% to be chosen, so noise does not
        flip the choice."""
        figures = {"direct": self.direct_gbps, "buffered": self.buffered_gbps}
        figures["mixed"] = self.mixed_gbps
        return _best(figures)

    @property
    def best_cpu(self) -> str:
        """The fastest cold mode for a CPU buffer, where a mapping (``map``) competes too: the
        loader's time to usable tensors then includes touching every page."""
        best = self.best
        figures = {best: getattr(self, f"{best}_gbps"), "map": self.map_gbps}
        if figures["map"] > figures[best] * 1.05:
            return "map"
        return best

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "fs_type": self.fs_type,
            "direct_gbps": self.direct_gbps,
            "buffered_gbps": self.buffered_gbps,
            "mixed_gbps": self.mixed_gbps,
            "map_gbps": self.map_gbps,
            "probe_bytes": self.probe_bytes,
            "measured_at": self.measured_at,
            "source": self.source,
            "best": self.best,
            "best_cpu": self.best_cpu,
        }


def _best(figures: Mapping[str, float]) -> str:
    if not any(v > 0 for v in figures.values()):
        return "direct"
    base = figures.get("direct", 0.0) * 1.05
    best = max(figures, key=lambda m: figures[m])
    if best != "direct" and figures[best] <= base:
        return "direct"
    return best


def read_mode(profile: ReadProfile | None, forced: str = "auto", *, cpu: bool = False) -> str:
    """The mode for cold bytes: the configured one, else the profile's best (``cpu``: a mapping
    may win for a CPU buffer)."""
    if forced != "auto":
        if forced not in COLD_MODES:
            raise ValueError(f"read_mode={forced!r}: expected auto or one of {COLD_MODES}")
        if forced == "map" and not cpu:
            return "buffered"  # a device buffer is never mapped: the closest read
        return forced
    if profile is None:
        return "direct"
    return profile.best_cpu if cpu else profile.best


@dataclass(frozen=True)
class Facts:
    """What is true of the checkpoint when the load starts.

    ``residency``: partition index -> fraction in the page cache (missing = 0).
    ``gpu_devices``: devices for which the GPU tier holds buffers matching this plan.
    ``dram``: the DRAM tier holds the whole checkpoint. ``dram_can_fill``: the DRAM tier is on,
    this load may fill it, and the checkpoint fits its budget. ``daemon``: the cache daemon handed
    over its copies of every partition. ``profile``: the filesystem's read-mode profile.
    ``streaming``: the partition files are an object store's download still arriving.
    """

    residency: Mapping[int, float] = field(default_factory=dict)
    gpu_devices: frozenset[str] = frozenset()
    dram: bool = False
    dram_can_fill: bool = False
    daemon: bool = False
    profile: ReadProfile | None = None
    streaming: bool = False


@dataclass(frozen=True)
class Settings:
    mmap_min_resident: float = 0.95
    buffered_min_resident: float = 0.5
    cpu_map_cached: bool = True
    verify: bool = False
    read_mode: str = "auto"


@dataclass(frozen=True)
class Decision:
    """Buffer ``buffer`` (on ``device``, bytes of partition ``partition``) gets its bytes from
    ``source``; ``fallback`` is the source to use if a DRAM-tier fill leaves no item to serve
    from. ``tier`` is where the bytes live."""

    buffer: int
    device: str
    partition: int
    source: Source
    fallback: Source | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, Source):
            try:
                object.__setattr__(self, "source", Source(self.source))
            except ValueError:
                raise ValueError(f"unknown byte source {self.source!r}") from None

    @property
    def tier(self) -> str:
        return self.source.tier


@dataclass(frozen=True)
class LoadDecision:
    """The policy's answer for one load: a decision per buffer (in buffer order) and what the
    load does with the DRAM tier."""

    buffers: tuple[Decision, ...]
    dram: DramAction = DramAction.NONE

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.buffers)

    def __len__(self) -> int:
        return len(self.buffers)

    def without_dram(self) -> LoadDecision:
        """The same load where the DRAM tier could not serve: every DRAM-tier buffer takes its
        fallback."""
        out = tuple(
            Decision(d.buffer, d.device, d.partition, d.fallback)
            if d.source is Source.DRAM_TIER and d.fallback is not None
            else d
            for d in self.buffers
        )
        return LoadDecision(out, DramAction.NONE)

    def without_daemon(self, fallback: LoadDecision) -> LoadDecision:
        """The daemon's buffers replaced by ``fallback``'s (a decision made without it)."""
        out = tuple(
            f if d.source is Source.DAEMON else d
            for d, f in zip(self.buffers, fallback.buffers, strict=True)
        )
        return LoadDecision(out, self.dram)


def decide(plan: LoadPlan, facts: Facts = Facts(), settings: Settings = Settings()) -> LoadDecision:
    """The ``LoadDecision`` for ``plan`` under ``facts`` (see the module docstring)."""
    gpu_mode = read_mode(facts.profile, settings.read_mode)
    cpu_mode = read_mode(facts.profile, settings.read_mode, cpu=True)
    if cpu_mode == "map" and (settings.verify or not settings.cpu_map_cached):
        cpu_mode = facts.profile.best if facts.profile is not None else "direct"
        if settings.read_mode == "map":
            cpu_mode = "buffered"
    fill = (
        facts.dram_can_fill
        and not facts.dram
        and not settings.verify
        and not facts.daemon
        and not facts.streaming
    )
    use = facts.dram and not settings.verify
    stream_cpu = (
        Source.STREAM_MAP if settings.cpu_map_cached and not settings.verify else Source.STREAM
    )
    out: list[Decision] = []
    for b in plan.buffers:
        # a buffer not laid out like the file (packed runs, a caller's memory) is read, never
        # mapped: it takes the cold mode of a device buffer
        mapped_ok = b.device == "cpu" and b.mappable
        if facts.streaming:
            plain = stream_cpu if mapped_ok else Source.STREAM
        else:
            plain = _plain(b, facts, settings, cpu_mode if mapped_ok else gpu_mode)
        if b.nbytes == 0:
            src = Source.EMPTY
        elif b.device != "cpu" and b.device in facts.gpu_devices:
            src = Source.GPU_TIER
        elif use:
            src = Source.DRAM_TIER
        elif facts.daemon and not facts.streaming:
            src = Source.DAEMON
        elif fill:
            out.append(Decision(b.index, b.device, b.partition, Source.DRAM_TIER, plain))
            continue
        else:
            src = plain
        out.append(Decision(b.index, b.device, b.partition, src))
    needs_dram = any(d.source is Source.DRAM_TIER for d in out)
    action = DramAction.NONE
    if needs_dram:
        action = DramAction.USE if use else DramAction.FILL
    return LoadDecision(tuple(out), action)


def _plain(b: BufferPlan, facts: Facts, settings: Settings, cold_mode: str) -> Source:
    """The source of a buffer from the files alone (rules 6 and 7)."""
    resident = facts.residency.get(b.partition, 0.0)
    if (
        b.device == "cpu"
        and b.mappable
        and settings.cpu_map_cached
        and not settings.verify
        and resident >= settings.mmap_min_resident
    ):
        return Source.PAGE_CACHE_MAP
    if resident >= settings.buffered_min_resident:
        return Source.PAGE_CACHE_READ
    return Source(cold_mode)


def mixed_split(file_start: int, file_end: int) -> int:
    """File offset where ``mixed`` mode switches from buffered to O_DIRECT reads for a partition
    range ``[file_start, file_end)`` (page aligned)."""
    cut = file_start + int((file_end - file_start) * MIXED_BUFFERED_FRACTION)
    return cut - cut % 4096


def summary(decisions: LoadDecision | tuple[Decision, ...]) -> str:
    """Source names joined by ``+`` (sorted, without ``empty``): ``LoadStats.path_taken``."""
    names = sorted({d.source.value for d in decisions if d.source is not Source.EMPTY})
    return "+".join(names) or "none"


def fill_mode(
    resident: float, profile: ReadProfile | None, settings: Settings = Settings()
) -> Source:
    """How a DRAM-tier fill reads a whole partition: buffered when it is mostly in the page cache,
    else the cold read mode (never a mapping: the fill copies)."""
    if resident >= settings.buffered_min_resident:
        return Source.PAGE_CACHE_READ
    return Source(read_mode(profile, settings.read_mode))


# Filesystems whose reads go over a network (or through FUSE): a local converted copy is faster.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "glusterfs", "9p", "afs")


def is_slow_source(kind: str, fs_type: str) -> bool:
    """Should the SSD tier keep a converted copy of this source? Stock safetensors (the copy is
    aligned and checksummed) and anything on a network or FUSE filesystem."""
    return kind != "fastckpt" or fs_type in NETWORK_FS or fs_type.startswith("fuse")


# What one more read costs beyond its bytes: a buffered read (a system call, or an io_uring entry,
# on the 2-core VM) and, for a device, also a host-to-device copy of its own from the ring.
READ_OP_S = 4e-6
DEVICE_OP_S = 15e-6
# Rate of reads served by the page cache (a copy by the kernel), when nothing better is known.
PAGE_CACHE_GBPS = 4.0


def gather_runs(
    runs: int,
    kept_bytes: int,
    span_bytes: int,
    *,
    device: bool = False,
    gbps: float = PAGE_CACHE_GBPS,
) -> bool:
    """Read a column shard as its ``runs`` (``kept_bytes`` in all; True) rather than as the one
    span of ``span_bytes`` they lie in (False), when that costs no more time: each read costs
    ``READ_OP_S`` (``DEVICE_OP_S`` to a device) plus its bytes at ``gbps``."""
    op_s = DEVICE_OP_S if device else READ_OP_S
    rate = max(gbps, 1e-3) * 1e9
    return runs * op_s + kept_bytes / rate <= op_s + span_bytes / rate


def read_gbps(
    profile: ReadProfile | None, resident: float, settings: Settings = Settings()
) -> float:
    """The rate a read of a partition can expect: the page cache's when it is resident, else
    what the profile measured for the cold mode (the page cache's rate when nothing was)."""
    if resident >= settings.buffered_min_resident or profile is None:
        return PAGE_CACHE_GBPS
    measured = getattr(profile, f"{profile.best}_gbps", 0.0)
    return measured if measured > 0 else PAGE_CACHE_GBPS
