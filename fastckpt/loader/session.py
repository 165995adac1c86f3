"""``fastckpt.Loader``: a load session that owns its engines, device stages, pinned pool and tiers.

``fastckpt.load()``, ``fastckpt.open()``, ``fastckpt.iter_tensors()``, ``load_model`` and the
vLLM weight source all go through a Loader (the process's default one unless told otherwise:
``fastckpt.loader.api``). One read of a checkpoint, whatever asked for it, is:

1. ``open_source``: open the checkpoint once, beneath its directory (or the SSD tier's converted
   copy of a slow source), and ask the machine's cache daemon for its copies when one is set;
2. ``execute``: plan (pure), gather the facts (GPU-tier buffers, the DRAM tier, page-cache
   residency, the read-mode profile), ask the policy once, fill the DRAM tier if it says so,
   run the one executor over the byte sources, offer fresh device buffers to the GPU tier, and
   report ``LoadStats``.

Helpers around it live beside it: ``opening`` (step 1), ``facts`` (what the policy is told:
the cached plan, GPU-tier revival, residency, the read profile), ``dramfill`` (the DRAM tier's
lookup and fill), ``ssdconvert`` (the SSD tier's converted copies), ``cachectl`` (prefetch,
evict, cache_info), ``stats`` (assembling ``LoadStats``), ``daemonsource`` (the cache daemon as
a byte source).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
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
    ObjectChangedError,
    TruncatedError,
)
from fastckpt.format.index import Index
from fastckpt.loader import cachectl, dramfill, facts, opening, policy, stats
from fastckpt.loader.daemonsource import warn_once
from fastckpt.loader.executor import Executor
from fastckpt.loader.facts import PlanCache, buffers_on
from fastckpt.loader.opening import Opened
from fastckpt.loader.plan import LoadPlan
from fastckpt.loader.policy import DramAction, Facts, Source
from fastckpt.loader.sources import Sources
from fastckpt.loader.sources import open_partition as _open_partition
from fastckpt.loader.ssdconvert import Conversions, convert_opened
from fastckpt.loader.staging import StagingRing, cuda_ring
from fastckpt.loader.target import check_devices, resolve_target
from fastckpt.loader.tiering import SingleFlight
from fastckpt.tiers.dram import DramItem, DramTier
from fastckpt.tiers.gpu import GpuTier
from fastckpt.tiers.held import PageLocker, lock_file_pages
from fastckpt.tiers.pool import HostPool
from fastckpt.tiers.ssd import SsdTier

TIERS = ("gpu", "dram", "ssd")
ENGINES = ("auto", "uring", "pread")

_current: contextvars.ContextVar[Loader | None] = contextvars.ContextVar(
    "fastckpt_loader", default=None
)


class Loader:
    """A load session.

    Args:
        engine: I/O engine kind (``auto``, ``uring``, ``pread``); default config ``io_engine``.
        gpu_tier_bytes, dram_tier_bytes, ssd_tier_bytes, ssd_tier_dir: tier budgets (0 = off)
            and the SSD tier's directory; defaults from the configuration (``FASTCKPT_*``).
        residency: a function path -> fraction of the file in the page cache (default: sampled
            ``mincore``/``cachestat``); a seam for tests and estimates.
        open_partition: how a validated open partition file becomes what a read or a mapping
            needs (default ``fastckpt.loader.sources.open_partition``); a seam for tests.
        page_locker: how the DRAM tier locks a partition's page cache for CPU-only items
            (default ``mlock``); None copies every item into memfd blocks instead.
        device_stage: a function ``(device, loader) -> DeviceStage`` that makes the stage moving
            bytes to a device (default: the CUDA stage). A seam: tests pass a stage over a fake
            copy backend, so the whole device path runs on CPU.
        ssd_converter: how the SSD tier's copy of a slow source is written: a function
            ``(loader, opened, dst)`` (default ``fastckpt.loader.ssdconvert.convert_opened``,
            which reads ``opened`` through this Loader's core). A seam for tests.
        **settings: any other configuration field (``read_mode``, ``ring_bytes``, ``server``...),
            fixed for this Loader. Settings not given are read from the environment at each load.
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
        device_stage: Callable[[str, Loader], Any] | None = None,
        ssd_converter: Callable[[Loader, Opened, str], Any] | None = None,
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
        self._residency = residency or facts.sampled_residency
        self._open_partition = open_partition or _open_partition
        self._stage_factory = device_stage
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, int, int, int], io_engine.Engine] = {}
        self._stages: dict[str, Any] = {}
        self._plans = PlanCache()
        self.pool = HostPool(piece_bytes=cfg.pool_piece_bytes, retain_bytes=cfg.ring_bytes)
        self._pinning_ready = False
        self.gpu_tier = GpuTier(cfg.gpu_tier_bytes)
        self.dram_tier = DramTier(cfg.dram_tier_bytes, self.pool, page_locker=page_locker)
        self.ssd_tier: SsdTier | None = (
            SsdTier(cfg.ssd_tier_bytes, _ssd_dir(cfg)) if cfg.ssd_tier_bytes > 0 else None
        )
        self.flights = SingleFlight()
        self.ssd_converter = ssd_converter or convert_opened
        self.conversions = Conversions()  # the SSD tier's, in the background
        self._background: ThreadPoolExecutor | None = None
        self._closed = False
        # a Loader dropped without close() still frees its tiers' items (locked memory,
        # descriptors) and its pool when it is collected
        self._free_tiers = weakref.finalize(
            self, _free_tiers, self.gpu_tier, self.dram_tier, self.pool
        )
        _LOADERS.add(self)

    # ------------------------------------------------------------------ resources
    def config(self, **overrides: Any) -> Config:
        """This Loader's settings now: defaults, ``FASTCKPT_*``, its own settings, ``overrides``."""
        return get_config(
            **{**self._overrides, **{k: v for k, v in overrides.items() if v is not None}}
        )

    def engine(self, cfg: Config | None = None) -> io_engine.Engine:
        """An I/O engine for the settings (one per kind and settings, shared by loads)."""
        cfg = cfg or self.config()
        threads = cfg.resolved_io_threads()
        key = (cfg.io_engine, cfg.queue_depth, threads, cfg.chunk_bytes)
        with self._lock:
            self._check_open()
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

    def _enable_pinning(self, backend: Any) -> None:
        """The pool (DRAM-tier blocks) pins through the first device stage's copy backend
        (portable pinning: usable for every device)."""
        with self._lock:
            if self._pinning_ready:
                return
            self.pool.pinner, self.pool.unpinner = backend.pin, backend.unpin
            self._pinning_ready = True

    def stage(self, device: str, cfg: Config | None = None) -> Any:
        """The device stage of ``device`` (made on first use, reused by later loads)."""
        cfg = cfg or self.config()
        with self._lock:
            self._check_open()
            st = self._stages.get(device)
        if st is not None:
            return st
        if self._stage_factory is not None:
            st = self._stage_factory(device, self)
        else:
            from fastckpt.loader.devstage import CudaStage

            st = CudaStage(device, cfg.copy_streams, lambda backend: cuda_ring(backend, cfg))
        self._enable_pinning(st.backend)
        with self._lock:
            return self._stages.setdefault(device, st)

    @property
    def current_ring(self) -> StagingRing | None:
        """The staging ring this Loader's device loads use (None before the first one)."""
        with self._lock:
            stages = list(self._stages.values())
        return stages[0].ring if stages else None

    @property
    def simulated_devices(self) -> bool:
        """True when device stages come from a factory (a fake device on CPU, in tests)."""
        return self._stage_factory is not None

    def _background_run(self, fn: Callable[[], Any]) -> Future[Any]:
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(2, thread_name_prefix="fastckpt-bg")
            pool = self._background
        return pool.submit(fn)

    @contextlib.contextmanager
    def use(self) -> Iterator[Loader]:
        """Within the block (this thread / async context), ``fastckpt.load`` uses this Loader."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this fastckpt.Loader is closed; make a new one")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free everything the tiers hold (except what callers still use), the pool and engines.
        A running SSD-tier conversion is cancelled (waited for until it stops; nothing of it is
        kept), queued ones never start. Later use of the Loader raises; a second ``close()``
        does nothing."""
        with self._lock:
            if self._closed:
                return
            self.conversions.cancel()
            self._closed = True
        self.conversions.close()
        if self._background is not None:
            self._background.shutdown(wait=True)
        self._free_tiers()
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
            self._stages.clear()
        for eng in engines:
            eng.close()

    def _after_fork(self) -> None:
        """In a child process: engines' threads, pinned memory and CUDA state belong to the
        parent. Drop them without touching them (no joins, no CUDA calls) and start afresh."""
        cfg = self.config()
        # Never destroyed here: an engine's destructor joins threads that do not exist in this
        # process, and pinned memory would be unregistered through a CUDA context it cannot use.
        _ABANDONED.append((self._engines, self._stages, self.pool, self.gpu_tier, self.dram_tier))
        self._lock = threading.Lock()
        self._plans = PlanCache()
        self._engines = {}
        self._stages = {}
        self._background = None
        self.conversions = Conversions()  # the parent's conversion thread is not in this process
        self._pinning_ready = False
        self.pool = HostPool(piece_bytes=cfg.pool_piece_bytes, retain_bytes=cfg.ring_bytes)
        self.gpu_tier = GpuTier(cfg.gpu_tier_bytes)
        self.dram_tier = DramTier(
            cfg.dram_tier_bytes, self.pool, page_locker=self.dram_tier.page_locker
        )
        self.flights = SingleFlight()
        self._free_tiers.detach()  # the parent's tiers are abandoned, never freed here
        self._free_tiers = weakref.finalize(
            self, _free_tiers, self.gpu_tier, self.dram_tier, self.pool
        )

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ opening
    def open_source(
        self,
        path: str | os.PathLike[str] | Index,
        *,
        cfg: Config | None = None,
        convert: bool = True,
        daemon: bool = True,
        verify: bool = False,
    ) -> Opened:
        """Open ``path`` for reading through the core (``fastckpt.loader.opening``): its
        validated files (the SSD tier's converted copy of a slow source when ``convert`` and the
        tier is on), and the cache daemon's copies when a server is configured and ``daemon``."""
        self._check_open()
        return opening.open_source(
            self, path, cfg or self.config(), convert=convert, daemon=daemon, verify=verify
        )

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
        t_start = time.perf_counter()
        target = resolve_target(device)
        for attempt in (1, 2):
            with self.open_source(path, cfg=cfg, verify=verify) as opened:
                try:
                    tensors, result = self.execute(
                        opened,
                        target,
                        names=names,
                        verify=verify,
                        cfg=cfg,
                        tiers=True,
                        t_start=t_start,
                    )
                except ObjectChangedError:
                    if attempt == 2:
                        raise
                    continue  # replaced while it was read: once more, from the new generation
                except _COPY_FAULTS as exc:
                    if opened.ssd_key is None or self.ssd_tier is None or attempt == 2:
                        raise
                    # the SSD tier's copy failed its checksums: dropped, rebuilt next attempt
                    self.ssd_tier.reject(opened.ssd_key, str(exc))
                    continue
            return (tensors, result) if stats else tensors
        raise AssertionError("unreachable")

    def execute(
        self,
        opened: Opened,
        target: Any,
        *,
        names: Iterable[str] | None = None,
        verify: bool = False,
        cfg: Config | None = None,
        tiers: bool = True,
        t_start: float | None = None,
        plan: LoadPlan | None = None,
        into: Mapping[int, Any] | None = None,
    ) -> tuple[dict[str, Any], stats.LoadStats]:
        """Read ``names`` (default all) of an opened checkpoint onto ``target`` (canonical):
        one policy decision, one executor run. ``tiers`` lets the load use and fill the GPU and
        DRAM tiers (whole loads); windows and single tensors only use what the DRAM tier and the
        daemon already hold. A ready ``plan`` may be passed (slices, shards). ``into`` maps
        buffers of that plan to the caller's own memory (contiguous uint8 tensors of the
        buffer's size on its device, e.g. a model's parameters, as ``plan_into`` plans them),
        which the load fills instead of allocating; only without tiers."""
        self._check_open()
        if into and (tiers or plan is None):
            raise ValueError(
                "execute(into=...) fills a caller's memory: pass its plan, tiers=False"
            )
        cfg = cfg or self.config()
        t_start = time.perf_counter() if t_start is None else t_start
        index, files = opened.index, opened.files
        if verify and index.checksum_algorithm is None:
            raise FormatError(
                f"verify=True needs chunk checksums, and a {index.kind} checkpoint has none; "
                "convert it with fastckpt.convert to get them",
                path=index.root,
            )
        if plan is None:
            plan = self._plans.get(index, target, names, cfg.ring_slot_bytes, verify)
        if not self.simulated_devices:
            check_devices(plan.devices)
        for dev in plan.devices:
            if dev != "cpu":
                self.stage(dev, cfg)  # made once; a DRAM-tier fill pins through its backend
        t_plan = time.perf_counter()
        settings = policy.Settings(
            mmap_min_resident=cfg.mmap_min_resident,
            cpu_map_cached=cfg.cpu_map_cached,
            verify=verify,
            read_mode=cfg.read_mode,
        )
        held: list[tuple[Any, Hashable]] = []  # (tier, key) pinned for this load
        unkept: DramItem | None = None
        notes = set(opened.notes)
        flight = ""
        try:
            revived, gpu_keys = (
                facts.revive(self.gpu_tier, opened.ident, plan, held) if tiers else ({}, {})
            )
            gpu_devices = frozenset(
                d for d in gpu_keys if any(b.index in revived for b in buffers_on(plan, d))
            )
            dram_item, can_fill = dramfill.lookup(
                self.dram_tier,
                opened.ident,
                index,
                plan,
                gpu_devices,
                verify=verify,
                maps_files=cfg.cpu_map_cached,
                may_fill=tiers,
                held=held,
            )
            streaming = opened.stream is not None
            residency, prof = (
                ({}, None)
                if streaming  # the files are still arriving: nothing to measure yet
                else facts.read_inputs(
                    index,
                    plan,
                    gpu_devices,
                    dram_item is not None,
                    cfg,
                    residency=self._residency,
                    engine=lambda: self.engine(cfg),
                )
            )
            known = Facts(
                residency=residency,
                gpu_devices=gpu_devices,
                dram=dram_item is not None,
                dram_can_fill=can_fill,
                daemon=bool(opened.daemon),
                profile=prof,
                streaming=streaming,
            )
            decision = policy.decide(plan, known, settings)
            if decision.dram is DramAction.FILL:
                fill_notes: list[str] = []
                dram_item, led = dramfill.fill(
                    self.dram_tier,
                    self.flights,
                    opened.ident,
                    index,
                    files,
                    engine=lambda: self.engine(cfg),
                    residency=lambda p: residency.get(p, 0.0),
                    profile=prof,
                    settings=settings,
                    cfg=cfg,
                    pinned=any(d.startswith("cuda") for d in plan.devices),
                    open_partition=self._open_partition,
                    background=self._background_run,
                    notes=fill_notes,
                )
                notes.update(fill_notes)
                flight = "leader" if led else "follower"
                if isinstance(dram_item, dramfill.Unkept):
                    unkept = dram_item
                elif dram_item is not None:
                    held.append((self.dram_tier, opened.ident))
                else:
                    decision = decision.without_dram()
            sources = Sources(
                engine=lambda: self.engine(cfg),
                files=files,
                daemon=opened.daemon,
                dram=dram_item.blocks if dram_item is not None else {},
                gpu=revived,
                stage=lambda dev: self.stage(dev, cfg),
                reclaim=self.gpu_tier.free_idle,
                open_partition=self._open_partition,
                stream=opened.stream,
                into=into or {},
            )
            executor = Executor(index, plan, decision, sources, cfg=cfg, verify=verify)
            try:
                tensors = executor.run()
            except ChecksumError as exc:
                if not any(d.source is Source.DAEMON for d in decision):
                    raise
                # The daemon's copy failed the check the index makes: never trust it; read
                # the files (which raise the same error if they are the corrupted ones).
                notes.add(f"the cache daemon's copy failed verification ({exc}); read the files")
                warn_once(f"its copy failed verification: {exc}")
                plain = policy.decide(plan, Facts(residency, gpu_devices, profile=prof), settings)
                decision = decision.without_daemon(plain)
                executor = Executor(index, plan, decision, sources, cfg=cfg, verify=verify)
                tensors = executor.run()
            if tiers:
                for dev, gkey in gpu_keys.items():
                    if dev in gpu_devices:
                        continue
                    mine = {b.index: executor.buffers[b.index] for b in buffers_on(plan, dev)}
                    self.gpu_tier.offer(gkey, mine)
        finally:
            for tier, hkey in held:
                tier.unpin(hkey)
            if unkept is not None:
                self.dram_tier.discard(unkept)
        expected = len(plan.views) + len(plan.aliases)
        if len(tensors) != expected:
            raise RuntimeError(
                f"internal error: delivered {len(tensors)} tensors, the plan has {expected}"
            )
        result = stats.assemble(
            index=index,
            plan=plan,
            decision=decision,
            executor=executor,
            tensors=len(tensors),
            t_start=t_start,
            t_plan=t_plan,
            t_end=time.perf_counter(),
            flight=flight,
            profile=prof,
            notes=notes,
        )
        stats.record(result)
        return tensors, result

    def read_gbps(self, opened: Opened, cfg: Config | None = None) -> float:
        """The rate a read of ``opened`` can expect now (``facts.read_gbps``)."""
        cfg = cfg or self.config()
        return facts.read_gbps(
            opened.index, bool(opened.daemon), cfg, self._residency, lambda: self.engine(cfg)
        )

    # ------------------------------------------------------------------ tiers API
    def prefetch(
        self, path: str | os.PathLike[str], tier: str = "dram", device: Any = "cuda"
    ) -> Future[bool]:
        """Warm ``tier`` (``dram``, ``ssd`` or ``gpu``) with the checkpoint in the background;
        the future's result says whether the tier holds it afterwards (``ssd``: the copy is made
        by this call, whatever ``ssd_convert`` says). A DRAM item meant for a
        GPU (``device``) is pinned in the background too, so a later hit copies at full speed."""
        self._check_open()
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {', '.join(TIERS)}")
        return self._background_run(lambda: cachectl.prefetch(self, os.fspath(path), tier, device))

    def evict(self, path: str | os.PathLike[str]) -> int:
        """Remove the checkpoint at ``path`` (every version of it) from the GPU and DRAM tiers and
        its converted copy from the SSD tier, except what is in use; returns items removed."""
        self._check_open()
        return cachectl.evict(self, path)

    def cache_info(self) -> dict[str, Any]:
        """Each tier's statistics and items (the SSD tier's also its conversions in the
        background: ``conversions``), the pool, and single-flight counts."""
        return cachectl.cache_info(self)


def _free_tiers(gpu: GpuTier, dram: DramTier, pool: HostPool) -> None:
    """What ``Loader.close`` and a collected Loader free (no reference to the Loader itself)."""
    for tier in (gpu, dram):
        tier.clear()
    pool.close()


# A converted copy of the SSD tier that fails these is the copy's fault: it is dropped and rebuilt
_COPY_FAULTS = (ChecksumError, CorruptDataError, MissingPartitionError, TruncatedError)

# Every Loader of the process, so that a forked child can reset them all; what they held in the
# parent is kept (never freed) in the child.
_LOADERS: weakref.WeakSet[Loader] = weakref.WeakSet()
_ABANDONED: list[Any] = []


def _reset_after_fork() -> None:
    for loader in list(_LOADERS):
        loader._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


__all__ = ["Loader", "Opened", "resolve_target"]
