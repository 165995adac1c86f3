"""The multiplexed Ray Serve deployment whose replicas load models through fastckpt.

Each replica serves the models of a ``Catalog`` by name (``multiplexed_model_id``), keeps up to
``max_models_per_replica`` of them resident (Ray Serve's multiplexed LRU cache), and loads a
missing one with ``fastckpt.load_model`` through its ``fastckpt.Loader``, whose DRAM and SSD
tiers keep the checkpoint after Ray Serve evicts the model; or through the node's
``fastckpt serve`` daemon (``tiers="daemon"``), which keeps it for every process of the node.
``mode="plain"`` loads with the engine's own loading (transformers' ``from_pretrained``, vLLM's
default loader) and no tiers (what a Ray Serve deployment does without fastckpt), for
comparisons.

``record_routing_stats`` reports ``HostState.report()``: what is resident, loading and queued,
what the tiers hold, free memory, and the tier speeds of the machine profile. Route with
``fastckpt.sched.ray_serve.StartTimeRouter`` (``build_app(router="start-time")``, the default).

Requests: ``handle.options(multiplexed_model_id=name, stream=True).generate.remote(prompt_ids,
max_new_tokens)`` streams greedy tokens; its first item is a header saying which replica
answered and whether (and from which tier) the request waited for a model start. Over HTTP,
``POST`` ``{"prompt": [...], "max_new_tokens": n}`` with the ``serve_multiplexed_model_id``
header returns the tokens.

What runs a model is the replica's ``engine`` (``runners``: one ``Runner`` per resident model,
behind one request path): ``transformers`` (default) loads by ``load_transformers`` or any
``model_loader(entry, device, loader) -> model`` callable (a model is anything ``decode_step``
can run, a transformers causal LM); ``vllm`` builds a vLLM engine in the replica's process per
model (``vllm_runner``), with ``load_format="fastckpt"`` reading through the replica's tiers
(``mode="plain"``: vLLM's default loader), one engine per replica (``max_models_per_replica=1``),
shut down when Ray Serve evicts the model. vLLM is imported only by replicas that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from fastckpt.integrations.ray_serve.catalog import Catalog, ModelEntry
from fastckpt.integrations.ray_serve.runners import (
    ENGINES,
    ModelLoader,
    Runner,
    check_engine,
    decode_step,
    greedy_tokens,
    load_transformers,
    runner_load,
)
from fastckpt.integrations.ray_serve.state import (
    STEP_THREADS,
    DaemonTiers,
    HostState,
    LoaderTiers,
    NoTiers,
    TierView,
)

logger = logging.getLogger("fastckpt.integrations.ray_serve")

__all__ = [
    "ENGINES",
    "MODES",
    "ModelHost",
    "Resident",
    "build_app",
    "decode_step",
    "deployment",
    "greedy_tokens",
    "load_transformers",
]

MODES = ("fastckpt", "plain")
TIER_SOURCES = ("loader", "daemon")


class Resident:
    """A model Ray Serve holds in its multiplexed cache, as the ``Runner`` serving it. Ray Serve
    calls ``__del__`` when it evicts the model: the replica's state then says so and the runner
    is released (a vLLM engine shut down once no request streams from it). The object may live
    on while a request still uses it, and the garbage collector calls ``__del__`` again: only
    the first counts."""

    def __init__(
        self,
        name: str,
        runner: Runner,
        tier: str,
        seconds: float,
        on_evict: Callable[[str], None],
        load_id: str = "",
    ) -> None:
        self.name = name
        self.runner = runner
        self.tier = tier
        self.seconds = seconds
        self.load_id = load_id
        self._on_evict: Callable[[str], None] | None = on_evict
        self._lock = threading.Lock()

    def __del__(self) -> None:
        with self._lock:
            hook, self._on_evict = self._on_evict, None
        if hook is not None:
            try:
                hook(self.name)
            finally:
                self.runner.release()


class ModelHost:
    """A replica of the serving deployment (use ``deployment()`` / ``build_app()``).

    Args:
        catalog: the models (a ``Catalog``, its dict form, or the path of its file).
        engine: what runs each model: ``transformers`` (a transformers causal LM, stepped by
            ``decode_step``) or ``vllm`` (a vLLM engine in the replica's process, built with
            ``load_format="fastckpt"`` through the replica's tiers, or vLLM's own default
            loader with ``mode="plain"``; needs vLLM installed where the replicas run and
            ``max_models_per_replica=1``; see ``vllm_runner``).
        mode: ``fastckpt`` (load through a Loader or the daemon) or ``plain`` (the engine's own
            loading: transformers' ``from_pretrained`` or vLLM's default loader; no tiers).
        device: where transformers models run (``cpu``, ``cuda:0``); a vLLM engine runs on its
            platform's device (the GPU Ray gives the replica), ``device`` is where its DRAM-tier
            copy is pinned for.
        tiers: ``loader``: the replica's ``fastckpt.Loader`` tiers, budgets and directories from
            ``loader_settings`` and the node's ``FASTCKPT_*`` settings; ``daemon``: the node's
            ``fastckpt serve`` daemon at ``server`` (or ``FASTCKPT_SERVER``).
        loader_settings: keyword arguments of ``fastckpt.Loader`` (``dram_tier_bytes``,
            ``ssd_tier_bytes``, ``ssd_tier_dir``...).
        profile: the machine profile with the tier speeds (default ``FASTCKPT_SCHED_PROFILE`` or
            the file ``fastckpt calibrate`` writes; absent: nominal speeds, reported as such).
        torch_threads: ``torch.set_num_threads`` in the replica (None: torch's default).
        isolate_page_cache: emulate a node of its own on a machine shared with other emulated
            nodes: after each load, evict from the page cache the catalog path it read (remote
            storage is never cached on a node) and the SSD-tier copies of every model this
            replica neither holds in its DRAM tier nor has resident (a node's memory holds what
            its tiers hold). Without it the machine's one page cache serves every "node". The
            eviction runs on the replica's load thread after the model is handed over (a real
            node has nothing to evict: requests do not wait for it, the next load does), and
            leaves alone the store paths other replicas may be reading at the time.
        model_loader: ``(entry, device, loader) -> model``; default ``load_transformers``
            (``engine="transformers"`` only).
        vllm_args: vLLM ``EngineArgs`` keywords for every model (``engine="vllm"`` only):
            ``dtype``, ``max_model_len``, ``kv_cache_memory_bytes``, ``enforce_eager``,
            ``model_loader_extra_config`` (the plug-in's options)...
        warm_up: before serving, import the catalog's model classes and load and run a tiny
            model through ``model_loader`` (a fresh process's first load otherwise pays
            seconds of imports and first-use costs); with ``engine="vllm"``, import vLLM.
    """

    max_models_per_replica = 0  # set by deployment()

    def __init__(
        self,
        catalog: Catalog | Mapping[str, Any] | str,
        *,
        engine: str = "transformers",
        mode: str = "fastckpt",
        device: str = "cpu",
        tiers: str = "loader",
        server: str = "",
        loader_settings: Mapping[str, Any] | None = None,
        profile: str | None = None,
        torch_threads: int | None = 1,
        isolate_page_cache: bool = False,
        model_loader: ModelLoader | None = None,
        vllm_args: Mapping[str, Any] | None = None,
        warm_up: bool = True,
    ) -> None:
        check_engine(engine)
        if engine == "vllm" and type(self).max_models_per_replica > 1:
            raise ValueError(_ONE_ENGINE)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if tiers not in TIER_SOURCES:
            raise ValueError(f"tiers={tiers!r}: expected one of {TIER_SOURCES}")
        import ray

        self.catalog = Catalog.of(catalog)
        self.mode = mode
        self.device = device
        self.engine = engine
        self._model_loader = model_loader or load_transformers
        self._isolate = isolate_page_cache
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        ctx = serve.get_replica_context()
        self.name = str(ctx.replica_id.unique_id)
        self.loader: Any = None
        view: TierView = NoTiers()
        if mode == "fastckpt":
            import fastckpt

            settings = dict(loader_settings or {})
            if tiers == "daemon":
                from fastckpt.config import get_config

                socket_path = server or get_config().server
                if not socket_path:
                    raise ValueError("tiers='daemon' needs server= or FASTCKPT_SERVER")
                settings["server"] = socket_path
                self.loader = fastckpt.Loader(**settings)
                view = DaemonTiers(socket_path, self.catalog)
            else:
                self.loader = fastckpt.Loader(**settings)
                view = LoaderTiers(self.loader, self.catalog)
        slots = type(self).max_models_per_replica or 1
        self.state = HostState(
            self.name,
            self.catalog,
            view,
            slots,
            profile=_read_profile(profile),
            node=str(ray.get_runtime_context().get_node_id()),
        )
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="fastckpt-load")
        self._step_pool = ThreadPoolExecutor(STEP_THREADS, thread_name_prefix="fastckpt-step")
        self._load = runner_load(
            engine, self._step_pool, model_loader=model_loader, vllm_args=vllm_args
        )
        if warm_up:
            self._warm_up()

    def _warm_up(self) -> None:
        """Pay a fresh process's one-time costs before the first request, not in its start:
        import the catalog's model classes, and load and run a tiny model through the same
        load function (no tiers, nothing kept). A vLLM replica imports vLLM (an engine start
        costs seconds of its own, which its first load pays)."""
        import tempfile

        if self.engine == "vllm":
            from fastckpt.integrations.ray_serve.vllm_runner import import_vllm

            import_vllm()
            return

        import transformers

        for entry in self.catalog.values():
            config = os.path.join(entry.path, "config.json")
            with contextlib.suppress(OSError, ValueError):
                with open(config, encoding="utf-8") as fh:
                    archs = json.load(fh).get("architectures") or []
                for arch in archs:
                    getattr(transformers, str(arch), None)
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
        with tempfile.TemporaryDirectory(prefix="fastckpt-warm-up-") as tmp:
            src = os.path.join(tmp, "model")
            transformers.LlamaForCausalLM(cfg).save_pretrained(src)
            loader = None
            if self.loader is not None:  # a throwaway Loader with both tiers: every code path
                import fastckpt

                loader = fastckpt.Loader(
                    dram_tier_bytes=64 << 20,
                    ssd_tier_bytes=64 << 20,
                    ssd_tier_dir=os.path.join(tmp, "ssd"),
                    gpu_tier_bytes=0,
                )
            try:
                for _ in range(2):  # a cold load (DRAM fill, conversion after it), a DRAM hit
                    model = self._model_loader(ModelEntry("warm-up", src, 1), self.device, loader)
                    decode_step(model, [1, 2, 3], None)
                if loader is not None:
                    loader.conversions.wait()  # the conversion's code paths too
            finally:
                if loader is not None:
                    loader.close()

    # ------------------------------------------------------------------ Ray Serve hooks
    async def record_routing_stats(self) -> dict[str, Any]:
        # off the event loop: a daemon's listing may take up to its bound, and requests wait
        return await asyncio.to_thread(self.state.report)

    async def _load_resident(self, model_id: str) -> Resident:
        """The body of the multiplexed loader (``deployment()`` wraps it)."""
        entry = self.catalog[model_id]
        tier = self.state.start(model_id)
        ok = False
        try:
            loop = asyncio.get_running_loop()
            runner = await loop.run_in_executor(
                self._load_pool, self._load, entry, self.device, self.loader
            )
            ok = True
        finally:
            seconds, seq = self.state.finish(model_id, ok)
        if self._isolate:  # not awaited: see isolate_page_cache
            self._load_pool.submit(self._drop_pages, model_id).add_done_callback(_log_failure)
        logger.info("%s: loaded %s from %s in %.3f s", self.name, model_id, tier, seconds)
        return Resident(model_id, runner, tier, seconds, self.state.evicted, f"{self.name}:{seq}")

    async def get_model(self, model_id: str) -> Resident:
        raise NotImplementedError("make the deployment with deployment() (multiplexed loader)")

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: list[int], max_new_tokens: int = 8) -> AsyncIterator[Any]:
        """Stream: a header dict, then ``max_new_tokens`` greedy token ids (ints)."""
        t_in = time.perf_counter()
        model_id = serve.get_multiplexed_model_id()
        _check_request(prompt, max_new_tokens)
        waited = self.state.request(model_id)
        try:
            res = await self.get_model(model_id)
        except BaseException:
            self.state.abandon(model_id)
            raise
        yield {
            "replica": self.name,
            "node": self.state.node,
            "model": model_id,
            "waited": waited,
            "tier": res.tier if waited else "resident",
            "load_s": res.seconds if waited else 0.0,
            "load": res.load_id if waited else "",
            # seconds from the request's arrival at the replica until its model was there
            # (its own start, or a wait for the model lock behind other starts)
            "wait_s": time.perf_counter() - t_in,
        }
        async for token in res.runner.stream(prompt, max_new_tokens):
            yield token

    async def ping(self) -> AsyncIterator[str]:
        """Stream this replica's name: the way of a request through Ray Serve without a model
        (what the serving system itself costs a request)."""
        yield self.name

    async def __call__(self, request: Any) -> dict[str, Any]:
        body = await request.json()
        if not isinstance(body, Mapping):
            raise ValueError('expected a JSON object {"prompt": [...], "max_new_tokens": n}')
        header: dict[str, Any] = {}
        tokens: list[int] = []
        prompt: Any = body.get("prompt")
        async for item in self.generate(prompt, body.get("max_new_tokens", 8)):
            if isinstance(item, dict):
                header = item
            else:
                tokens.append(item)
        return {**header, "tokens": tokens}

    def report(self) -> dict[str, Any]:
        """The routing stats now (for people; routers get them through Ray Serve)."""
        return self.state.report()

    def engines(self) -> dict[str, Any]:
        """The engine this replica runs models with, and (``vllm``) the models whose engine is
        alive in its process (for people and tests)."""
        live: list[str] = []
        if self.engine == "vllm":
            from fastckpt.integrations.ray_serve.vllm_runner import live_engines

            live = live_engines()
        return {"engine": self.engine, "mode": self.mode, "live": live}

    # ------------------------------------------------------------------ page cache
    def _drop_pages(self, just_loaded: str) -> None:
        from fastckpt.io_engine import drop_page_cache

        keep = set(self.state.view.held().get("dram", {})) | set(self.state.resident)
        keep.add(just_loaded)
        files = _local_files([self.catalog[just_loaded].path])
        files += _local_files([p for n in self.catalog if n not in keep for p in self._copies(n)])
        for path in files:
            with contextlib.suppress(OSError):
                drop_page_cache(path)  # pages mapped by a resident model stay

    def _copies(self, name: str) -> list[str]:
        """The SSD tier's converted copies of model ``name`` on this node."""
        view = self.state.view
        if not isinstance(view, LoaderTiers) or not view.ssd_dir:
            return []
        return [os.path.join(view.ssd_dir, k) for k, m in view.by_ssd_key.items() if m == name]


_ONE_ENGINE = (
    "engine='vllm' keeps one vLLM engine per replica process (vLLM's parallel state is per "
    "process): use max_models_per_replica=1 and more replicas"
)


def _log_failure(fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:
        logger.warning("page-cache eviction after a load failed: %r", exc)


def _check_request(prompt: Any, max_new_tokens: Any) -> None:
    if (
        not isinstance(prompt, list)
        or not prompt
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        raise ValueError("prompt must be a non-empty list of token ids (ints >= 0)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ValueError("max_new_tokens must be an int")
    if not 1 <= max_new_tokens <= 4096:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected 1..4096")


def _local_files(roots: list[str]) -> list[str]:
    """Regular files at or under each local root (URLs are skipped)."""
    out: list[str] = []
    for root in roots:
        if "://" in root:
            continue
        if os.path.isfile(root):
            out.append(root)
        for dirpath, _, names in os.walk(root):
            out.extend(os.path.join(dirpath, n) for n in names)
    return out


def _read_profile(path: str | None) -> Any:
    from fastckpt.config import sched_profile_path
    from fastckpt.sched.model import SchedError
    from fastckpt.sched.profile import MachineProfile

    target = path or sched_profile_path()
    try:
        return MachineProfile.load(target)
    except SchedError as exc:
        if path:  # asked for by name: its absence is an error
            raise
        logger.warning("no usable tier profile (%s): nominal tier speeds", exc)
        return None


def deployment(
    max_models_per_replica: int = 2, *, name: str = "FastckptModelHost", **options: Any
) -> Any:
    """The Ray Serve deployment of ``ModelHost`` keeping ``max_models_per_replica`` models
    resident per replica; ``options`` go to ``serve.deployment`` (``num_replicas``,
    ``ray_actor_options``, ``max_replicas_per_node``, ``request_router_config``...)."""
    if max_models_per_replica < 1:
        raise ValueError("max_models_per_replica must be >= 1")

    class Host(ModelHost):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, model_id: str) -> Resident:
            return await self._load_resident(model_id)

    Host.max_models_per_replica = max_models_per_replica
    Host.__name__ = Host.__qualname__ = name
    return serve.deployment(Host, name=name, **options)


def build_app(
    catalog: Catalog | Mapping[str, Any] | str,
    *,
    num_replicas: int,
    router: str = "start-time",
    max_models_per_replica: int = 2,
    stats_period_s: float = 1.0,
    reservations: str = "actor",
    reservation_ttl_s: float | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
    max_replicas_per_node: int | None = None,
    max_ongoing_requests: int = 8,
    name: str = "FastckptModelHost",
    **host: Any,
) -> Any:
    """A bound Ray Serve application of the deployment (``serve.run(build_app(...))``).

    ``router``: ``start-time`` (``StartTimeRouter`` on the replicas' stats, reserving starts
    with ``reservations``) or ``default`` (Ray Serve's own router; the replicas still report
    stats). ``host``: keyword arguments of ``ModelHost`` (``engine``, ``mode``, ``tiers``, ...).
    """
    from ray.serve.config import RequestRouterConfig

    if host.get("engine") == "vllm" and max_models_per_replica != 1:
        raise ValueError(_ONE_ENGINE)

    cat = Catalog.of(catalog)
    options: dict[str, Any] = {
        "num_replicas": num_replicas,
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 0}),
    }
    if max_replicas_per_node is not None:
        options["max_replicas_per_node"] = max_replicas_per_node
    if router == "start-time":
        from fastckpt.sched.ray_serve import StartTimeRouter

        kwargs: dict[str, Any] = {
            # a multiplexed replica evicts its LRU model to make room: starts need no free slot
            "models": {n: {"nbytes": e.nbytes, "gpus": 0} for n, e in cat.items()},
            "reservations": reservations,
            "reservations_name": f"start-reservations-{name}-{os.getpid()}",
            "reservation_ttl_s": reservation_ttl_s or max(3.0, 3 * stats_period_s),
        }
        config: dict[str, Any] = {
            "request_router_class": StartTimeRouter,
            "request_router_kwargs": kwargs,
            "request_routing_stats_period_s": stats_period_s,
        }
    elif router == "default":
        config = {"request_routing_stats_period_s": stats_period_s}
    else:
        raise ValueError(f"router={router!r}: expected 'start-time' or 'default'")
    options["request_router_config"] = RequestRouterConfig(**config)
    dep = deployment(max_models_per_replica, name=name, **options)
    return dep.bind(cat.as_dict(), **host)
