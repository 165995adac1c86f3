"""The one configuration surface. No other module reads ``os.environ``.

Every knob has an environment variable ``FASTCKPT_<NAME>``, a typed default whose unit is in its
name, and a documented trade-off. ``get_config()`` reads the environment each time it is called
(cheap), so a process can change a knob between loads; ``get_config(**overrides)`` applies
explicit values on top.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class Config:
    """Tunable settings, with their defaults.

    Attributes:
        io_engine: ``auto`` | ``uring`` | ``pread``. ``auto`` prefers io_uring and falls back to
            the pread thread pool when io_uring is unavailable (the reason is queryable through
            ``fastckpt.engine_info()``). Forcing one is for diagnosis and benchmarks.
        queue_depth: reads in flight per engine. Deeper queues keep NVMe arrays busy; beyond
            what the device can serve they only add memory and latency.
        io_threads: worker threads of the pread pool (0 = one per core, at most 16). More threads
            help page-cache copies (memory bound) up to the core count.
        chunk_bytes: size of one read request. Large chunks amortise per-request cost; too large
            and the pipeline fills slowly (the first copy to the GPU waits for the first chunk).
        ring_bytes: most pinned host memory the process's staging ring for GPU loads may grow
            to. The ring starts with two slots, pinned on the first GPU load; more are pinned in
            the background when a load is larger than the ring or waited for a slot, and then
            reused by every later load of the process. Bigger rings keep more reads in flight
            (deep queues for fast storage); pinning costs 0.4-1 s/GB, once.
        ring_slot_bytes: size of one ring slot (one read, one host-to-device copy). Larger
            slots mean fewer, longer copies; smaller ones start the first copy sooner.
        copy_streams: CUDA streams host-to-device copies are spread over (round robin); several
            copies are in flight at once.
        pin_method: how ring slots are pinned: ``register`` (2 MiB-aligned anonymous memory,
            transparent huge pages, then cuMemHostRegister), ``memfd`` (a memfd mapping, then
            registered), ``alloc`` (cuMemHostAlloc), or ``auto``: the fastest of the three,
            measured once per machine and kept with the machine profile.
        checksum_chunk_bytes: bytes covered by one checksum when writing a checkpoint. Smaller
            chunks locate corruption more precisely and verify with finer parallelism; the index
            grows by 8 bytes per chunk.
        partition_bytes: size cap of one partition file when converting.
        alignment_bytes: alignment of every tensor's offset inside a partition (>= 256).
        write_buffer_bytes: bytes buffered by the converter before each write.
        mmap_min_resident: fraction of a file that must be in the page cache for the CPU loader
            to map it instead of reading it.
        cpu_map_cached: let CPU loads of page-cached partitions map the file privately (no copy;
            tensors are copy-on-write views of the page cache). The fastest warm path; like any
            mapping (safetensors' too), truncating the file while the tensors live makes access
            fault (SIGBUS). Set false to always copy into private memory.
        cpu_huge_pages: whether the private memory a CPU load reads into is advised for
            transparent huge pages: ``auto`` (while free huge pages cover it: faster where they
            are at hand, and never a wait on the kernel compacting memory; see
            ``fastckpt.loader.hugepages``), ``always`` or ``never``.
        progress: show progress bars (``auto`` = only when stderr is a terminal).
        read_mode: how bytes that are not in the page cache are read: ``auto`` (what the
            machine profile measured as fastest on that filesystem), ``direct`` (O_DIRECT),
            ``buffered`` (through the page cache, with readahead) or ``mixed`` (buffered
            readahead over the first part of each partition, O_DIRECT over the rest).
        profile_dir: where the machine profile (read-mode probe results, one file per device
            and filesystem) is kept; empty = ``$XDG_CACHE_HOME/fastckpt`` or
            ``~/.cache/fastckpt``.
        probe: run the one-time read-mode probe when a filesystem has no profile yet (a few
            hundred milliseconds, once). When false, ``auto`` falls back to ``direct``.
        gpu_tier_bytes: device memory the GPU tier may keep after a caller dropped every tensor
            of a loaded checkpoint (0 = off). Kept buffers are freed on a budget overflow or
            when an allocation fails. Off by default: kept memory shows up as used.
        dram_tier_bytes: host memory for the DRAM tier (0 = off): whole checkpoints, as the
            files' page cache locked in memory (CPU-only items) or in memfds, pinned when a GPU
            is present. A hit maps them copy-on-write (CPU) or copies them
            (GPU) without touching storage.
        ssd_tier_bytes: disk budget of the SSD tier (0 = off): converted copies of slower
            sources (stock safetensors, network filesystems) in ``ssd_tier_dir``.
        ssd_tier_dir: directory of the SSD tier; empty = ``<cache dir>/fastckpt/ssd``.
        ssd_convert: when the SSD tier makes its copy of a slow source it does not hold yet:
            ``background`` (the load reads the source directly, as without the tier, and the
            copy is made after it on a thread of the Loader, for the next load) or ``inline``
            (the load converts first, then reads the copy: the first load waits for the
            conversion, about 5 s per GiB on a 2-core VM, but the process is done with the
            source once it returns).
        pool_piece_bytes: the Loader's pinned host pool pins memory in pieces of this size,
            lazily, the first time a piece is used for a GPU copy; pinned pieces are reused.
        server: socket path of a ``fastckpt serve`` cache daemon that loads ask first (empty:
            none). Without a reachable daemon, loads read the files directly (one warning).
        server_timeout_s: longest wait on the daemon's socket (connect, each reply, a fill
            making no progress) before a load gives up on it and reads the files directly.
        server_fill_wait_s: longest a load waits for one answer of the daemon however its fill
            progresses (a fill slower than this is left to finish for later loads; this one
            reads the files directly).
        server_uid: a user id whose daemon clients trust besides their own uid and root (the
            daemon's credentials are checked with ``SO_PEERCRED`` before anything it sends is
            used). Root is always trusted, so the default 0 adds nobody.
        migrate_secret_file: file holding the shared secret of the migration transport (at
            least 16 bytes, readable by its owner only). When set, migration servers require
            every frame to carry an HMAC made with it and clients add one (docs/migrate.md).
        remote_concurrency: ranged GETs in flight at once for one download from ``s3://`` or
            ``https://`` (docs/remote.md). More keeps a fast network busy; each costs a
            connection and a range's worth of socket buffers.
        remote_range_bytes: bytes asked for by one ranged GET (rounded up to whole checksum
            chunks for fastckpt checkpoints, so each range is verified as it arrives). Larger
            ranges cost fewer requests; smaller ones deliver the first tensor sooner and lose
            less to a dropped connection.
        remote_retries: attempts after the first for one range (throttling, a dropped
            connection, a short or corrupted response), with exponential backoff and jitter.
        remote_timeout_s: longest wait for a connection or for the next bytes of a response;
            a store that stalls longer is retried, and after the retries the load fails.
        remote_fresh_s: how long an SSD-tier copy of a remote checkpoint is used without asking
            the store whether the objects changed (0: ask once per open, one LIST or HEAD; an
            unreachable store then serves the copy with a warning).
        remote_flight_wait_s: longest a process waits for another process on the same SSD tier
            directory that is downloading the same checkpoint before it downloads it itself.
        remote_endpoint: S3 endpoint URL (MinIO, Ceph...); overrides ``AWS_ENDPOINT_URL``.
        remote_region: S3 region; overrides ``AWS_REGION`` and the shared config file.
        remote_profile: named profile of the shared AWS config and credentials files.
        remote_anonymous: send unsigned requests (public buckets); no credentials are looked up.
    """

    io_engine: str = "auto"
    queue_depth: int = 32
    io_threads: int = 0
    chunk_bytes: int = 4 * _MiB
    ring_bytes: int = 512 * _MiB
    ring_slot_bytes: int = 32 * _MiB
    copy_streams: int = 4
    pin_method: str = "auto"
    checksum_chunk_bytes: int = 16 * _MiB
    partition_bytes: int = 4 * _GiB
    alignment_bytes: int = 256
    write_buffer_bytes: int = 64 * _MiB
    mmap_min_resident: float = 0.95
    cpu_map_cached: bool = True
    cpu_huge_pages: str = "auto"
    progress: str = "auto"
    read_mode: str = "auto"
    profile_dir: str = ""
    probe: bool = True
    gpu_tier_bytes: int = 0
    dram_tier_bytes: int = 0
    ssd_tier_bytes: int = 0
    ssd_tier_dir: str = ""
    ssd_convert: str = "background"
    pool_piece_bytes: int = 64 * _MiB
    server: str = ""
    server_timeout_s: float = 10.0
    server_fill_wait_s: float = 300.0
    server_uid: int = 0
    migrate_secret_file: str = ""
    remote_concurrency: int = 8
    remote_range_bytes: int = 16 * _MiB
    remote_retries: int = 5
    remote_timeout_s: float = 30.0
    remote_fresh_s: float = 0.0
    remote_flight_wait_s: float = 600.0
    remote_endpoint: str = ""
    remote_region: str = ""
    remote_profile: str = ""
    remote_anonymous: bool = False

    def resolved_io_threads(self) -> int:
        if self.io_threads > 0:
            return self.io_threads
        return max(1, min(os.cpu_count() or 1, 16))


_CHOICES: dict[str, tuple[str, ...]] = {
    "io_engine": ("auto", "uring", "pread"),
    "progress": ("auto", "always", "never"),
    "pin_method": ("auto", "register", "memfd", "alloc"),
    "read_mode": ("auto", "direct", "buffered", "mixed", "map"),
    "cpu_huge_pages": ("auto", "always", "never"),
    "ssd_convert": ("background", "inline"),
}

_PATHS = ("profile_dir", "ssd_tier_dir", "server", "migrate_secret_file")


def _parse(name: str, raw: str, kind: Any) -> Any:
    env = f"FASTCKPT_{name.upper()}"
    try:
        if kind is int or kind == "int":
            value: Any = int(raw, 0)
            if value < 0:
                raise ValueError("negative")
        elif kind is float or kind == "float":
            value = float(raw)
        elif kind is bool or kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("not a boolean")
            value = lowered in ("1", "true", "yes", "on")
        elif name in _PATHS:
            value = raw
        elif name in _CHOICES:
            value = raw.strip().lower()
        else:
            value = raw.strip()
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a valid {kind}") from None
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ValueError(f"{env}={raw!r}: expected one of {', '.join(choices)}")
    return value


def get_config(**overrides: Any) -> Config:
    """The current configuration: defaults, then ``FASTCKPT_*`` variables, then ``overrides``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = os.environ.get(f"FASTCKPT_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _parse(f.name, raw, f.type)
    for key, value in overrides.items():
        if key not in {f.name for f in dataclasses.fields(Config)}:
            raise TypeError(f"unknown fastckpt setting {key!r}")
        if value is not None:
            values[key] = value
    cfg = Config(**values)
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: expected one of {', '.join(choices)}")
    if cfg.alignment_bytes < 256 or cfg.alignment_bytes & (cfg.alignment_bytes - 1):
        raise ValueError(f"alignment_bytes={cfg.alignment_bytes}: must be a power of two >= 256")
    if cfg.checksum_chunk_bytes < 4096 or cfg.checksum_chunk_bytes % 4096:
        raise ValueError(
            f"checksum_chunk_bytes={cfg.checksum_chunk_bytes}: must be a positive multiple of 4096"
        )
    if cfg.ring_slot_bytes < 4096 or cfg.ring_slot_bytes % 4096:
        raise ValueError(f"ring_slot_bytes={cfg.ring_slot_bytes}: must be a multiple of 4096")
    if cfg.remote_concurrency < 1 or cfg.remote_range_bytes < 4096:
        raise ValueError(
            f"remote_concurrency={cfg.remote_concurrency}, remote_range_bytes="
            f"{cfg.remote_range_bytes}: need at least 1 and 4096"
        )
    if cfg.pool_piece_bytes < 4096 or cfg.pool_piece_bytes % 4096:
        raise ValueError(f"pool_piece_bytes={cfg.pool_piece_bytes}: must be a multiple of 4096")
    return cfg


def cache_dir(cfg: Config | None = None) -> str:
    """The user's fastckpt cache directory: ``$XDG_CACHE_HOME/fastckpt`` or
    ``~/.cache/fastckpt``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastckpt")


def profile_dir(cfg: Config) -> str:
    return cfg.profile_dir or os.path.join(cache_dir(cfg), "profile")


def ssd_tier_dir(cfg: Config) -> str:
    return cfg.ssd_tier_dir or os.path.join(cache_dir(cfg), "ssd")


def aws_environment() -> tuple[tuple[str, str], ...]:
    """The ``AWS_*`` variables now (sorted): what an S3 client made now would be configured by
    besides fastckpt's own ``remote_*`` settings. Read here so that clients made under other
    variables are not reused; the values themselves are read by boto3."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


# --- fastckpt.sched: where the scheduler's machine profile lives ------------------------------


def sched_profile_path() -> str:
    """Path of the scheduler's machine profile (``fastckpt calibrate`` writes it).

    ``FASTCKPT_SCHED_PROFILE`` if set, else ``sched-profile.json`` in the user cache directory
    (``$XDG_CACHE_HOME/fastckpt``, default ``~/.cache/fastckpt``).
    """
    explicit = os.environ.get("FASTCKPT_SCHED_PROFILE")
    if explicit:
        return explicit
    return os.path.join(cache_dir(), "sched-profile.json")
