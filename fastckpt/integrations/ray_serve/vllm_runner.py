"""``engine="vllm"``: a vLLM engine per resident model, in the replica's own process.

Why in-process, and not vLLM's ``AsyncLLM``: ``AsyncLLM`` always runs its engine core in a
process of its own (on CPU with a worker process beneath it), which loads the weights there.
Neither the replica's ``fastckpt.Loader`` nor its DRAM tier can reach that process: the
checkpoint would be read into a process that dies with the engine, and the routing stats
would not see it. So the runner builds vLLM's ``LLMEngine`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor (vLLM's supported in-process
setting, the one its ``LLM`` class uses offline): the engine core and its worker live in the
replica, the plug-in (``load_format="fastckpt"``) reads through the Loader made current with
``Loader.use()`` while the engine is built, and one thread per engine steps it, handing each
request its new tokens after every step (``RequestOutputKind.DELTA``): the first token streams
as soon as the prefill step ends.

Tiers: with the replica's Loader tiers, the checkpoint is first put in the DRAM tier
(``Loader.prefetch``: a stock safetensors folder is read from the SSD tier's copy where there
is one, else from the source, its copy made after it in the background, as for transformers
models), then the plug-in reads that DRAM item (the ``checkpoint`` option names the checkpoint
the tier holds: the copy or the source). With ``tiers="daemon"`` the Loader is the daemon's
client and the plug-in maps the daemon's copy. ``mode="plain"`` builds the engine with vLLM's
own default loader and no fastckpt.

One engine per process: vLLM keeps its parallel state (process groups) per process, and
shutting one engine down tears it down for every engine of the process. A replica therefore
holds one vLLM engine at a time (``max_models_per_replica=1``); when Ray Serve evicts the
model, the engine is shut down (after any request still streaming from it ends) and its
memory freed before the next one is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastckpt.integrations.ray_serve.catalog import ModelEntry

logger = logging.getLogger("fastckpt.integrations.ray_serve")

#: Engine arguments the runner sets itself (the model, how it is loaded, in-process).
RESERVED_ARGS = ("model", "load_format", "distributed_executor_backend")
#: Defaults a user's ``vllm_args`` may override.
DEFAULT_ARGS: dict[str, Any] = {"skip_tokenizer_init": True, "seed": 0, "disable_log_stats": True}
#: How long a new engine waits for the previous one of the process to shut down (a request
#: still streaming from an evicted engine keeps it until it ends).
PREVIOUS_ENGINE_WAIT_S = 300.0

_live_lock = threading.Condition()
_live: list[str] = []  # models whose engine is alive in this process (at most one)


def in_process() -> None:
    """Make vLLM run its engine core in this process (before vLLM is imported: vLLM reads the
    setting from the environment)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def import_vllm() -> None:
    """Import what an engine start needs (a replica's warm-up pays this, not its first load)."""
    in_process()
    import vllm  # noqa: F401
    from vllm.v1.engine.llm_engine import LLMEngine  # noqa: F401


def live_engines() -> list[str]:
    """The models whose vLLM engine is alive in this process."""
    with _live_lock:
        return list(_live)


def check_args(engine_args: Mapping[str, Any]) -> None:
    """Refuse ``vllm_args`` the runner decides itself, or an engine that cannot run
    in-process."""
    taken = sorted(set(engine_args) & set(RESERVED_ARGS))
    if taken:
        raise ValueError(
            f"vllm_args {taken}: the deployment sets these (model: the catalog path; "
            "load_format: mode='fastckpt' or 'plain'; executor: in-process)"
        )
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if int(engine_args.get(key, 1)) != 1:
            raise ValueError(
                f"vllm_args {key}={engine_args[key]!r}: the replica runs its engine in-process, "
                "on one device; use several replicas instead"
            )


def checkpoint_in_tiers(loader: Any, path: str, device: str) -> str:
    """Put the checkpoint at ``path`` in ``loader``'s DRAM tier (from its SSD-tier copy when it
    is a slow source that has one; see ``fastckpt.loader.opening``) and return the checkpoint
    the tier holds, which the plug-in then reads. A daemon's client Loader reads the daemon's
    copy: nothing to do."""
    if loader.config().server:
        return path
    held = loader.prefetch(path, "dram", device).result()
    if not held:
        logger.warning("%s does not fit the DRAM tier: vLLM reads it from its files", path)
    with loader.open_source(path) as opened:  # what the DRAM tier holds: the copy or the source
        return str(opened.index.root)


def load_vllm(
    entry: ModelEntry, device: str, loader: Any, *, engine_args: Mapping[str, Any]
) -> VllmRunner:
    """A vLLM engine for ``entry`` (see the module docstring): ``loader`` is the replica's
    ``fastckpt.Loader`` (``load_format="fastckpt"`` through it) or None (vLLM's default
    loader). Returns once the engine can take requests."""
    check_args(engine_args)
    in_process()
    from vllm import EngineArgs
    from vllm import envs as vllm_envs
    from vllm.v1.engine.llm_engine import LLMEngine

    if vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise RuntimeError(
            "vLLM read VLLM_ENABLE_V1_MULTIPROCESSING before the replica set it to 0; do not "
            "set it in the replica's environment"
        )
    args: dict[str, Any] = {**DEFAULT_ARGS, **engine_args, "distributed_executor_backend": "uni"}
    use: Any = contextlib.nullcontext()
    if loader is None:
        args["load_format"] = "auto"
    else:
        extra = dict(args.get("model_loader_extra_config") or {})
        extra["checkpoint"] = checkpoint_in_tiers(loader, entry.path, device)
        args["load_format"] = "fastckpt"
        args["model_loader_extra_config"] = extra
        use = loader.use()  # the plug-in's loads go through the replica's Loader
    _claim(entry.name)
    try:
        with use:
            engine = LLMEngine.from_engine_args(EngineArgs(model=entry.path, **args))
    except BaseException:
        _free(entry.name)
        raise
    return VllmRunner(engine, entry.name)


def _claim(name: str) -> None:
    with _live_lock:
        if not _live_lock.wait_for(lambda: not _live, PREVIOUS_ENGINE_WAIT_S):
            raise RuntimeError(
                f"cannot start a vLLM engine for {name!r}: the engine of {_live[0]!r} is still "
                "alive in this replica (one engine per process; max_models_per_replica=1)"
            )
        _live.append(name)


def _stop(engine: Any) -> None:
    """Shut ``engine``'s core and worker down (their memory is freed once the engine object is
    dropped: ``_free``)."""
    with contextlib.suppress(Exception):
        engine.engine_core.shutdown()


def greedy_params(max_new_tokens: int) -> Any:
    """vLLM sampling parameters of a greedy request of exactly ``max_new_tokens`` tokens (as the
    transformers runner: no stop at end-of-sequence), its new tokens reported after each step."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def vllm_cleanup() -> None:
    """Clear vLLM's per-process state (process groups, caches) after an engine shut down, and
    collect the engine (vLLM freezes the objects it made at start-up out of the garbage
    collector's reach; this unfreezes them first)."""
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


def _free(name: str, cleanup: Callable[[], None] = vllm_cleanup) -> None:
    """Free the dropped engine (``cleanup``) and let the next engine of the process start."""
    try:
        cleanup()
    finally:
        with _live_lock:
            with contextlib.suppress(ValueError):
                _live.remove(name)
            _live_lock.notify_all()


_Deliver = Callable[[Any], None]


class VllmRunner:
    """Streams greedy tokens from one in-process ``LLMEngine``; its thread adds requests, steps
    the engine while any request is unfinished, and hands out each step's new tokens.

    ``sampling`` (``max_new_tokens -> SamplingParams``) and ``cleanup`` (after the engine shut
    down) are seams for tests with a stand-in engine."""

    def __init__(
        self,
        engine: Any,
        name: str,
        *,
        sampling: Callable[[int], Any] = greedy_params,
        cleanup: Callable[[], None] = vllm_cleanup,
    ) -> None:
        self.name = name
        self._engine: Any = engine
        self._sampling = sampling
        self._cleanup = cleanup
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._active = 0  # streams in progress
        self._closing = False  # evicted: stop once no stream is in progress
        self._stopped = False  # the step thread takes no more requests
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"fastckpt-vllm-{name}", daemon=True)
        self._thread.start()

    async def stream(self, prompt: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(got.put_nowait, item)

        rid = f"{self.name}-{next(self._ids)}"
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the vLLM engine of {self.name!r} was shut down")
            self._active += 1
            self._inbox.put(("add", rid, list(prompt), max_new_tokens, deliver))
        ended = False
        try:
            while True:
                item = await got.get()
                if item is None:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                for token in item:
                    yield int(token)
        finally:
            if not ended:  # the caller went away: stop generating for it
                self._inbox.put(("abort", rid))
            self._leave()

    def release(self) -> None:
        """Shut the engine down now, or when the last request streaming from it ends; waits
        for the shutdown when no request holds the engine (so its memory is free for the
        next model)."""
        with self._lock:
            self._closing = True
            stop = self._active == 0 and not self._stopped
            if stop:
                self._stop_locked()
        if stop and threading.current_thread() is not self._thread:
            self._thread.join()

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._closing and self._active == 0 and not self._stopped:
                self._stop_locked()

    def _stop_locked(self) -> None:
        self._stopped = True
        self._inbox.put(("stop",))

    def _run(self) -> None:
        engine = self._engine
        streams: dict[str, _Deliver] = {}
        failure: BaseException | None = None
        try:
            while True:
                cmds = [] if streams else [self._inbox.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        cmds.append(self._inbox.get_nowait())
                for cmd in cmds:
                    if cmd[0] == "stop":
                        return
                    if cmd[0] == "abort":
                        if streams.pop(cmd[1], None) is not None:
                            engine.abort_request([cmd[1]])
                        continue
                    _, rid, prompt, n, deliver = cmd
                    try:
                        params = self._sampling(n)
                        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
                    except Exception as exc:  # e.g. a token id beyond the vocabulary
                        deliver(exc)
                        continue
                    streams[rid] = deliver
                if not streams:
                    continue
                for out in engine.step():
                    deliver = streams.get(out.request_id)
                    if deliver is None:
                        continue
                    tokens = list(out.outputs[0].token_ids) if out.outputs else []
                    if tokens:
                        deliver(tokens)
                    if out.finished:
                        del streams[out.request_id]
                        deliver(None)
        except BaseException as exc:  # the engine failed: every request hears it
            failure = exc
            logger.exception("vLLM engine of %s failed", self.name)
        finally:
            with self._lock:
                self._stopped = True
                left = []
                with contextlib.suppress(queue.Empty):
                    while True:
                        left.append(self._inbox.get_nowait())
            err = failure or RuntimeError(f"the vLLM engine of {self.name!r} was shut down")
            for deliver in streams.values():
                deliver(err)
            for cmd in left:
                if cmd[0] == "add":
                    cmd[4](err)
            _stop(engine)
            self._engine = None
            del engine
            _free(self.name, self._cleanup)
