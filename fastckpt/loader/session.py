"""``fastckpt.Loader``: a load session that owns its engines, pinned pool, tiers and settings.

``fastckpt.load()`` and ``fastckpt.load_model()`` use a process-wide default Loader (made on
first use from the configuration); make your own for other budgets or an engine of your choice,
and call its ``load``, or make it current for a block (``with loader.use(): ...``) so that code
calling ``fastckpt.load`` (``load_model``, ``load_lora``) goes through it.

One load: read the index (through the SSD tier for slower sources), plan (pure), look up what the
tiers hold, measure page-cache residency, look up the filesystem's read-mode profile, ask the
policy (pure) for one decision per buffer, fill the DRAM tier when the policy says so (one read
shared by concurrent loads of the same checkpoint: single flight), execute, offer the device
buffers to the GPU tier, report.

Why one module of this size: the Loader's methods share its locks, budgets and single-flight
table, and each step above is short; split by step, each piece would need the whole object.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastckpt import io_engine
from fastckpt.config import Config, get_config
from fastckpt.config import ssd_tier_dir as _ssd_dir
from fastckpt.errors import (
    ChecksumError,
    CorruptDataError,
    FormatError,
    MissingPartitionError,
    TruncatedError,
)
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint, open_partitions, read_index
from fastckpt.loader import policy, profile
from fastckpt.loader.executor import Executor, Sources, fill_blocks
from fastckpt.loader.executor import open_partition as _open_partition
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.staging import StagingRing
from fastckpt.loader.stats import LoadStats, record
from fastckpt.loader.tiering import SingleFlight, checkpoint_identity, plan_signature
from fastckpt.rules.devices import check_cuda_visible
from fastckpt.tiers.dram import DramItem, DramTier
from fastckpt.tiers.gpu import GpuTier
from fastckpt.tiers.held import PageLocker, lock_file_pages
from fastckpt.tiers.pool import HostPool
from fastckpt.tiers.ssd import SsdTier, source_files

# A converted copy of the SSD tier that fails these is the copy's fault: it is dropped and rebuilt
_COPY_FAULTS = (ChecksumError, CorruptDataError, MissingPartitionError, TruncatedError)

# Windows sampled to estimate residency: an exact count costs ~4 ms per GiB, a sample ~0.1 ms.
RESIDENCY_SAMPLES = 256
TIERS = ("gpu", "dram", "ssd")


def _sampled_residency(path: str) -> float:
    try:
        return io_engine.residency(path, sample_windows=RESIDENCY_SAMPLES)
    except OSError:
        return 0.0


ENGINES = ("auto", "uring", "pread")


def _open(path: str | os.PathLike[str] | Index) -> OpenCheckpoint:
    """The checkpoint with its validated files open (an ``Index`` given by the caller has its
    partitions opened again, with the same rules)."""
    if isinstance(path, Index):
        return OpenCheckpoint(path, open_partitions(path), {})
    return open_checkpoint(path)


def _check_devices(devices: Iterable[str]) -> None:
    if not any(d.startswith("cuda") for d in devices):
        return
    import torch

    note = f" (torch {torch.__version__}, built with CUDA {torch.version.cuda})"
    check_cuda_visible(devices, torch.cuda, note=note)


_current: contextvars.ContextVar[Loader | None] = contextvars.ContextVar(
    "fastckpt_loader", default=None
)
_default: Loader | None = None
_default_lock = threading.Lock()


def default_loader() -> Loader:
    """The Loader ``fastckpt.load`` uses: the one made current with ``Loader.use()``, else the
    process-wide default (made on first use from the configuration)."""
    global _default
    current = _current.get()
    if current is not None:
        return current
    with _default_lock:
        if _default is None:
            _default = Loader()
        return _default


def peek_default() -> Loader | None:
    return _default


def set_default_loader(loader: Loader | None) -> Loader | None:
    """Replace the process-wide default Loader (None: make a fresh one on next use); returns the
    previous one (not closed)."""
    global _default
    with _default_lock:
        old, _default = _default, loader
    return old


class Loader:
    """A load session.

    Args:
        engine: I/O engine kind (``auto``, ``uring``, ``pread``); default config ``io_engine``.
        gpu_tier_bytes, dram_tier_bytes, ssd_tier_bytes, ssd_tier_dir: tier budgets (0 = off)
            and the SSD tier's directory; defaults from the configuration (``FASTCKPT_*``).
        residency: a function path -> fraction of the file in the page cache (default: sampled
            ``mincore``/``cachestat``); a seam for tests and estimates.
        open_partition: how a validated open partition file becomes what a read or a mapping
            needs (default
            ``fastckpt.loader.executor.open_partition``); a seam for tests.
        page_locker: how the DRAM tier locks a partition's page cache for CPU-only items
            (default ``mlock``, ``fastckpt.tiers.held.lock_file_pages``); None copies every
            item into memfd blocks instead. When locking fails (``RLIMIT_MEMLOCK``) the item is
            copied too, and the load's ``notes`` say so. A seam for tests.
        **settings: any other configuration field (``read_mode``, ``ring_bytes``...), fixed for
            this Loader. Settings not given are read from the environment at each load.
    """

    def __init__(
        self,
        *,
        engine: str | None = None,
        gpu_tier_bytes: int | None = None,
        dram_tier_bytes: int | None = None,
        ssd_tier_bytes: int | None = None,
        ssd_tier_dir: str | None = None,
        residency: Callable[[str], float] | None = None,
        open_partition: Callable[..., Any] | None = None,
        page_locker: PageLocker | None = lock_file_pages,
        **settings: Any,
    ) -> None:
        self._overrides: dict[str, Any] = dict(settings)
        for name, value in (
            ("io_engine", engine),
            ("gpu_tier_bytes", gpu_tier_bytes),
            ("dram_tier_bytes", dram_tier_bytes),
            ("ssd_tier_bytes", ssd_tier_bytes),
            ("ssd_tier_dir", ssd_tier_dir),
        ):
            if value is not None:
                self._overrides[name] = value
        cfg = self.config()  # validates the settings now
        self._residency = residency or _sampled_residency
        self._open_partition = open_partition or _open_partition
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, int, int, int], io_engine.Engine] = {}
        self._ring: StagingRing | None = None
        self.pool = HostPool(piece_bytes=cfg.pool_piece_bytes, retain_bytes=cfg.ring_bytes)
        self._pinning_ready = False
        self.gpu_tier = GpuTier(cfg.gpu_tier_bytes)
        self.dram_tier = DramTier(cfg.dram_tier_bytes, self.pool, page_locker=page_locker)
        self.ssd_tier: SsdTier | None = (
            SsdTier(cfg.ssd_tier_bytes, _ssd_dir(cfg)) if cfg.ssd_tier_bytes > 0 else None
        )
        self._flights = SingleFlight()
        self._background: ThreadPoolExecutor | None = None
        self._closed = False
        # a Loader dropped without close() still frees its tiers' items (locked memory,
        # descriptors) and its pool when it is collected
        self._free_tiers = weakref.finalize(
            self, _free_tiers, self.gpu_tier, self.dram_tier, self.pool
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this fastckpt.Loader was closed; make a new one to load again")

    # ------------------------------------------------------------------ resources
    def config(self, **overrides: Any) -> Config:
        """This Loader's settings now: defaults, ``FASTCKPT_*``, its own settings, ``overrides``."""
        return get_config(
            **{**self._overrides, **{k: v for k, v in overrides.items() if v is not None}}
        )

    def engine(self, cfg: Config | None = None) -> io_engine.Engine:
        """An I/O engine for the settings (one per kind and settings, shared by loads)."""
        self._check_open()
        cfg = cfg or self.config()
        threads = cfg.resolved_io_threads()
        key = (cfg.io_engine, cfg.queue_depth, threads, cfg.chunk_bytes)
        with self._lock:
            eng = self._engines.get(key)
            if eng is None:
                eng = io_engine.Engine(
                    cfg.io_engine,
                    queue_depth=cfg.queue_depth,
                    threads=threads,
                    chunk_bytes=cfg.chunk_bytes,
                )
                self._engines[key] = eng
            return eng

    def _enable_pinning(self) -> None:
        """Give the pool CUDA pinning the first time a GPU load needs pinned memory."""
        with self._lock:
            if self._pinning_ready:
                return
            from fastckpt.tiers.pool import cuda_pinner

            self.pool.pinner, self.pool.unpinner = cuda_pinner()
            self._pinning_ready = True

    def ring(self, slot_bytes: int, cfg: Config | None = None) -> StagingRing:
        """The staging ring (made on first GPU load, slots pinned lazily, from the pool)."""
        self._check_open()
        cfg = cfg or self.config()
        self._enable_pinning()
        with self._lock:
            if self._ring is None or self._ring.slot_bytes < slot_bytes:
                if self._ring is not None:
                    self._ring.close()
                slots = max(2, cfg.ring_bytes // slot_bytes)
                pool = self.pool if cfg.pin_method in ("auto", "pool") else None
                self._ring = StagingRing(slot_bytes, slots, cfg.pin_method, pool=pool)
            return self._ring

    @property
    def current_ring(self) -> StagingRing | None:
        return self._ring

    @contextlib.contextmanager
    def use(self) -> Iterator[Loader]:
        """Within the block (this thread / async context), ``fastckpt.load`` uses this Loader."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def close(self) -> None:
        """Free everything the tiers hold (except what callers still use), the pool and engines."""
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._background.shutdown(wait=True)
        if self._ring is not None:
            self._ring.close()
        self._free_tiers()
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for eng in engines:
            eng.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: str | os.PathLike[str] | Index,
        device: Any = "cpu",
        *,
        engine: str | None = None,
        verify: bool = False,
        names: Iterable[str] | None = None,
        stats: bool = False,
        private_copy: bool | None = None,
    ) -> Any:
        """Load a checkpoint; the arguments and result are those of ``fastckpt.load``. ``path``
        may also be an ``Index`` already read (its files are opened and checked again)."""
        self._check_open()
        if isinstance(names, (str, bytes)):
            raise TypeError(
                f"names={names!r} is a single string; pass a list of tensor names "
                f"(names=[{names!r}])"
            )
        if engine is not None and engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        overrides: dict[str, Any] = {"io_engine": engine}
        if private_copy is not None:
            overrides["cpu_map_cached"] = not private_copy
        cfg = self.config(**overrides)
        if cfg.server and not isinstance(path, Index):
            from fastckpt.serve.client import load_via_server  # the cache daemon (docs/serve.md)

            served = load_via_server(
                path,
                device,
                names_=names,
                verify=verify,
                stats=stats,
                server=cfg.server,
                timeout_s=cfg.server_timeout_s,
                fill_wait_s=cfg.server_fill_wait_s,
                trust_uid=cfg.server_uid,
            )
            if served is not None:
                return served
        t_start = time.perf_counter()
        # Every file is opened once, beneath the checkpoint directory, and read through those
        # descriptors only: a checkpoint republished meanwhile is never mixed in.
        with _open(path) as ck:
            for attempt in (1, 2):
                ssd_key: str | None = None
                converted: OpenCheckpoint | None = None
                if self.ssd_tier is not None and not isinstance(path, Index):
                    converted, ssd_key = self._through_ssd(ck.index, os.fspath(path))
                try:
                    use = converted or ck
                    return self._load_index(
                        use.index, use.partitions, device, cfg, verify, names, stats, t_start
                    )
                except _COPY_FAULTS as exc:
                    if ssd_key is None or self.ssd_tier is None or attempt == 2:
                        raise
                    self.ssd_tier.reject(ssd_key, str(exc))  # rebuilt on the second attempt
                finally:
                    if converted is not None:
                        converted.close()
                    if ssd_key is not None and self.ssd_tier is not None:
                        self.ssd_tier.unpin(ssd_key)
            raise AssertionError("unreachable")

    def _load_index(
        self,
        index: Index,
        files: Sequence[OpenFile],
        device: Any,
        cfg: Config,
        verify: bool,
        names: Iterable[str] | None,
        want_stats: bool,
        t_start: float,
    ) -> Any:
        if verify and index.checksum_algorithm is None:
            raise FormatError(
                f"verify=True needs chunk checksums, and a {index.kind} checkpoint has none; "
                "convert it with fastckpt.convert to get them",
                path=index.root,
            )
        plan = plan_load(
            index,
            device if not isinstance(device, Mapping) else dict(device),
            names=names,
            chunk_bytes=cfg.ring_slot_bytes,
            verify=verify,
        )
        _check_devices(plan.devices)
        ident = checkpoint_identity(index, files)
        t_plan = time.perf_counter()
        settings = policy.Settings(
            mmap_min_resident=cfg.mmap_min_resident,
            cpu_map_cached=cfg.cpu_map_cached,
            verify=verify,
            read_mode=cfg.read_mode,
        )
        held: list[tuple[Any, Hashable]] = []  # (tier, key) pinned for this load
        unkept: DramItem | None = None  # a DRAM item read for this load alone
        fill_notes: list[str] = []
        if any(d.startswith("cuda") for d in plan.devices):
            self._enable_pinning()
        try:
            # GPU tier: revive idle buffers of this very plan
            revived: dict[int, Any] = {}
            gpu_keys: dict[str, Hashable] = {}
            for dev in plan.devices:
                if dev == "cpu" or self.gpu_tier.capacity_bytes == 0:
                    continue
                gpu_keys[dev] = key = (*ident, dev, plan_signature(plan, dev))
                item = self.gpu_tier.revive(key)
                if item is not None:
                    held.append((self.gpu_tier, key))
                    revived.update(item.buffers)
            gpu_devices = frozenset(
                d for d in gpu_keys if any(b.index in revived for b in _bufs(plan, d))
            )
            # DRAM tier: hit, or may fill
            dram_item, can_fill = self._dram_lookup(
                index, ident, plan, gpu_devices, verify, held, maps_files=cfg.cpu_map_cached
            )
            holdings = policy.Holdings(gpu_devices, dram_item is not None, can_fill)
            residency, prof = self._inputs(index, plan, holdings, cfg)
            decisions = policy.decide(
                plan, residency=residency, holdings=holdings, profile=prof, settings=settings
            )
            flight = ""
            if any(d.source == "dram-fill" for d in decisions):
                dram_item, led = self._fill_dram(
                    index,
                    files,
                    ident,
                    residency,
                    prof,
                    settings,
                    cfg,
                    pinned=any(d.startswith("cuda") for d in plan.devices),
                    notes=fill_notes,
                )
                flight = "leader" if led else "follower"
                if isinstance(dram_item, _Unkept):
                    unkept = dram_item
                elif dram_item is not None:
                    held.append((self.dram_tier, ident))
                if not led:
                    holdings = policy.Holdings(gpu_devices, dram_item is not None, False)
                    residency, prof = self._inputs(index, plan, holdings, cfg)
                    decisions = policy.decide(
                        plan,
                        residency=residency,
                        holdings=holdings,
                        profile=prof,
                        settings=settings,
                    )
            sources = Sources(
                engine=lambda: self.engine(cfg),
                ring=lambda slot: self.ring(slot, cfg),
                files=files,
                open_partition=self._open_partition,
                dram=dram_item.blocks if dram_item is not None else {},
                gpu=revived,
                reclaim=self.gpu_tier.free_idle,
            )
            executor = Executor(index, plan, decisions, sources, cfg=cfg, verify=verify)
            tensors = executor.run()
            # GPU tier: keep track of fresh device buffers
            for dev, gkey in gpu_keys.items():
                if dev in gpu_devices:
                    continue
                mine = {b.index: executor.buffers[b.index] for b in _bufs(plan, dev)}
                self.gpu_tier.offer(gkey, mine)
        finally:
            for tier, hkey in held:
                tier.unpin(hkey)
            if unkept is not None:
                self.dram_tier.discard(unkept)
        t_exec = time.perf_counter()
        timings = executor.timings
        expected = len(plan.views) + len(plan.aliases)
        if len(tensors) != expected:
            raise RuntimeError(
                f"internal error: delivered {len(tensors)} tensors, the plan has {expected}"
            )
        by_tier: dict[str, int] = {}
        for d in decisions:
            by_tier[d.tier] = by_tier.get(d.tier, 0) + plan.buffers[d.buffer].nbytes
        result = LoadStats(
            path=index.root,
            kind=index.kind,
            devices=plan.devices,
            nbytes=plan.tensor_nbytes,
            read_nbytes=plan.read_nbytes,
            tensors=len(tensors),
            buffers=len(plan.buffers),
            seconds=t_exec - t_start,
            plan_s=t_plan - t_start,
            alloc_s=timings.alloc_s,
            read_wait_s=timings.read_wait_s,
            copy_wait_s=timings.copy_wait_s,
            verify_s=timings.verify_s,
            ring_s=timings.ring_s,
            finalize_s=timings.finalize_s + executor.views_s,
            engine=executor.engine_name,
            path_taken=policy.summary(decisions),
            verified_chunks=executor.verifier.checked if executor.verifier else 0,
            decisions=tuple((d.buffer, d.device, d.source, d.tier) for d in decisions),
            tier_nbytes=by_tier,
            flight=flight,
            read_profile=prof.as_dict() if prof is not None else None,
            notes=tuple(sorted(timings.notes | set(fill_notes))),
        )
        record(result)
        return (tensors, result) if want_stats else tensors

    # ------------------------------------------------------------------ pieces
    def _inputs(
        self, index: Index, plan: LoadPlan, holdings: policy.Holdings, cfg: Config
    ) -> tuple[dict[int, float], policy.ReadProfile | None]:
        """Residency of the partitions the policy may read, and the read-mode profile when some
        of them are cold."""
        if holdings.dram:
            return {}, None
        parts = sorted(
            {
                b.partition
                for b in plan.buffers
                if b.nbytes and not (b.device != "cpu" and b.device in holdings.gpu_devices)
            }
        )
        residency = {p: self._residency(index.partitions[p].path) for p in parts}
        cold = [p for p in parts if residency[p] < policy.Settings().buffered_min_resident]
        prof = None
        if cold and cfg.read_mode == "auto":
            largest = max(cold, key=lambda p: index.partitions[p].nbytes)
            prof = profile.profile_for(index.partitions[largest].path, cfg, self.engine(cfg))
        return residency, prof

    def _dram_lookup(
        self,
        index: Index,
        ident: tuple[str, str],
        plan: LoadPlan,
        gpu_devices: frozenset[str],
        verify: bool,
        held: list[tuple[Any, Hashable]],
        *,
        maps_files: bool = True,
    ) -> tuple[DramItem | None, bool]:
        """The DRAM item to serve from (pinned for this load), or whether the tier may be
        filled. Without ``maps_files`` (``private_copy=True``) an item holding the files' page
        cache is not used for CPU buffers: the load reads into memory of its own instead."""
        if self.dram_tier.capacity_bytes == 0 or verify:
            return None, False
        if all(b.nbytes == 0 or b.device in gpu_devices for b in plan.buffers):
            return None, False  # nothing left to read
        item = self.dram_tier.get(ident)
        if (
            item is not None
            and item.held
            and not maps_files
            and any(b.device == "cpu" and b.nbytes for b in plan.buffers)
        ):
            return None, False
        if item is not None and self.dram_tier.pin(ident):
            held.append((self.dram_tier, ident))
            return item, False
        total = sum(p.nbytes for p in index.partitions)
        return None, total <= self.dram_tier.capacity_bytes

    def _fill_dram(
        self,
        index: Index,
        files: Sequence[OpenFile],
        ident: tuple[str, str],
        residency: Mapping[int, float],
        prof: policy.ReadProfile | None,
        settings: policy.Settings,
        cfg: Config,
        *,
        pinned: bool,
        notes: list[str] | None = None,
    ) -> tuple[DramItem | None, bool]:
        """Read the whole checkpoint into a DRAM-tier item, once for concurrent callers. Returns
        (item pinned for the caller or None, whether this call did the reading). The leader gets
        its item even when the tier could not keep it (bypass): the bytes are read anyway.

        Without ``pinned`` (no GPU target), the item holds the partitions' own page cache,
        locked in memory (``fastckpt.tiers.held``); if locking fails, for GPU targets, or when
        loads must not map files (``cpu_map_cached`` off: ``private_copy``), the partitions are
        read into memfd blocks from the pool."""

        def work() -> DramItem:
            sizes = {i: p.nbytes for i, p in enumerate(index.partitions)}
            if not pinned and cfg.cpu_map_cached and self.dram_tier.page_locker is not None:
                held = self._hold(index, files)
                if held is not None:
                    return held
                if notes is not None:
                    notes.append(
                        "dram-tier: could not lock the page cache "
                        f"({self.dram_tier.last_lock_error}); copied into memory"
                    )
            item = self.dram_tier.new_item(sizes)
            try:
                modes = {
                    i: policy.fill_mode(
                        residency.get(i, self._residency(index.partitions[i].path)), prof, settings
                    )
                    for i in sizes
                }
                fill_blocks(
                    index,
                    item.blocks,
                    modes,
                    self.engine(cfg),
                    files,
                    chunk_bytes=cfg.chunk_bytes,
                    opener=self._open_partition,
                )
            except BaseException:
                self.dram_tier.discard(item)
                raise
            return item

        def lead() -> tuple[DramItem, bool]:
            item = work()
            kept = self.dram_tier.put(ident, item, item.nbytes, pin=True)
            return item, kept

        (item, kept), led = self._flights.run(("dram", ident), lead)
        if led:
            if not kept:
                # not in the tier: this load owns the blocks; they go when its tensors do
                return _Unkept(item), True
            return item, True
        # a follower: the leader's item, if the tier kept it
        got = self.dram_tier.get(ident)
        if got is not None and self.dram_tier.pin(ident):
            return got, False
        return None, False

    def _hold(self, index: Index, files: Sequence[OpenFile]) -> DramItem | None:
        """A DRAM item keeping the partitions' page cache, through duplicates of the validated
        descriptors (size checked again); None when locking failed."""
        fds: dict[int, tuple[int, int]] = {}
        try:
            for i, part in enumerate(index.partitions):
                fds[i] = (self._open_partition(index, i, files[i], direct=None), part.nbytes)
        except BaseException:
            for fd, _ in fds.values():
                os.close(fd)
            raise
        return self.dram_tier.hold_files(fds)

    def _through_ssd(self, index: Index, source: str) -> tuple[OpenCheckpoint | None, str | None]:
        """The SSD tier's converted copy of a slower source (keyed by content, checked, converted
        on first use; the tier owns all of it: fastckpt.tiers.ssd)."""
        assert self.ssd_tier is not None
        try:
            _, fs_type = profile.fs_key(index.partitions[0].path) if index.partitions else ("", "")
        except OSError:
            return None, None
        if not policy.is_slow_source(index.kind, fs_type) or not index.partitions:
            return None, None
        got = self.ssd_tier.open_copy(source_files(index), source)
        return (None, None) if got is None else got

    # ------------------------------------------------------------------ tiers API
    def prefetch(
        self, path: str | os.PathLike[str], tier: str = "dram", device: Any = "cuda"
    ) -> Future[bool]:
        """Warm ``tier`` (``dram``, ``ssd`` or ``gpu``) with the checkpoint in the background;
        the future's result says whether the tier holds it afterwards."""
        self._check_open()
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {', '.join(TIERS)}")
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(2, thread_name_prefix="fastckpt-prefetch")
            pool = self._background
        return pool.submit(self._prefetch, os.fspath(path), tier, device)

    def _prefetch(self, path: str, tier: str, device: Any) -> bool:
        if tier == "gpu":
            tensors = self.load(path, device)
            del tensors
            with _open(path) as ck:
                ident = checkpoint_identity(ck.index, ck.partitions)
            return any(k[:2] == ident for k in _tuple_keys(self.gpu_tier.keys()))
        cfg = self.config()
        with _open(path) as ck:
            converted: OpenCheckpoint | None = None
            key: str | None = None
            if self.ssd_tier is not None:
                converted, key = self._through_ssd(ck.index, path)
                if key is not None:
                    self.ssd_tier.unpin(key)  # the copy's files stay open until we are done
            try:
                if tier == "ssd":
                    return key is not None
                use = converted or ck
                return self._prefetch_dram(
                    use.index, use.partitions, cfg, pinned=_wants_pinned(device)
                )
            finally:
                if converted is not None:
                    converted.close()

    def _prefetch_dram(
        self, index: Index, files: Sequence[OpenFile], cfg: Config, *, pinned: bool
    ) -> bool:
        ident = checkpoint_identity(index, files)
        if self.dram_tier.holds(ident):
            return True
        if sum(p.nbytes for p in index.partitions) > self.dram_tier.capacity_bytes:
            return False
        plan = plan_load(index, "cpu", chunk_bytes=cfg.ring_slot_bytes)
        residency, prof = self._inputs(index, plan, policy.Holdings(), cfg)
        item, _ = self._fill_dram(
            index, files, ident, residency, prof, policy.Settings(), cfg, pinned=pinned
        )
        if item is not None and not isinstance(item, _Unkept):
            self.dram_tier.unpin(ident)
        elif isinstance(item, _Unkept):
            self.dram_tier.discard(item)
        return self.dram_tier.holds(ident)

    def evict(self, path: str | os.PathLike[str]) -> int:
        """Remove the checkpoint at ``path`` (every version of it) from the GPU and DRAM tiers and
        its converted copy from the SSD tier, except what is in use; returns items removed."""
        self._check_open()
        roots = {os.path.realpath(os.fspath(path))}
        with contextlib.suppress(OSError, FormatError):
            roots.add(os.path.realpath(read_index(path).root))
        removed = 0
        for tier in (self.gpu_tier, self.dram_tier):
            for key in _tuple_keys(tier.keys()):
                if key[0] in roots and tier.evict(key):
                    removed += 1
        if self.ssd_tier is not None:
            with contextlib.suppress(OSError, FormatError):
                index = read_index(path)
                if self.ssd_tier.evict_source(source_files(index), os.fspath(path)):
                    removed += 1
        return removed

    def cache_info(self) -> dict[str, Any]:
        """Each tier's statistics and items, the pool, and single-flight counts."""
        self.gpu_tier.sweep_modified()
        out: dict[str, Any] = {}
        for name, tier in (
            ("gpu", self.gpu_tier),
            ("dram", self.dram_tier),
            ("ssd", self.ssd_tier),
        ):
            if tier is None:
                out[name] = None
                continue
            info = tier.stats().as_dict()
            if isinstance(tier, DramTier):
                info.update(tier.describe())
            info["keys"] = [
                {"key": list(k) if isinstance(k, tuple) else k, "nbytes": tier.size_of(k)}
                for k in tier.keys()  # noqa: SIM118 - a tier, not a dict
            ]
            out[name] = info
        out["pool"] = {
            "allocated_blocks": self.pool.allocated,
            "reused_blocks": self.pool.reused,
            "retained_bytes": self.pool.retained_bytes,
        }
        out["single_flight"] = {
            "leaders": self._flights.leaders,
            "followers": self._flights.followers,
        }
        ring = self._ring
        out["ring"] = None if ring is None else {"slots": ring.slots, "slot_bytes": ring.slot_bytes}
        return out


def _free_tiers(gpu: GpuTier, dram: DramTier, pool: HostPool) -> None:
    """What ``Loader.close`` and a collected Loader free (no reference to the Loader itself)."""
    for tier in (gpu, dram):
        tier.clear()
    pool.close()


class _Unkept(DramItem):
    """A DRAM item the tier could not keep; owned by one load."""

    def __init__(self, item: DramItem) -> None:
        super().__init__(item.blocks, item.nbytes)


def _wants_pinned(device: Any) -> bool:
    """Whether a DRAM-tier item for ``device`` should be pinnable memory (a visible GPU)."""
    devices = device.values() if isinstance(device, Mapping) else [device]
    if not any(str(d).startswith("cuda") for d in devices):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _bufs(plan: LoadPlan, device: str) -> list[Any]:
    return [b for b in plan.buffers if b.device == device]


def _tuple_keys(keys: Iterable[Hashable]) -> list[tuple[Any, ...]]:
    return [k for k in keys if isinstance(k, tuple)]
