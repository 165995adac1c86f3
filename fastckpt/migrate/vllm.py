"""Live migration between vLLM engines: both migration sides over vLLM's ``LLMEngine``.

``VllmEngine`` owns one vLLM V1 ``LLMEngine`` with its engine core in this process, on a thread
of its own that builds it and makes every call into it; it steps by itself or when told. Every
request it runs is served by continuous batching as usual; ``start()`` begins one that is also
a ``MigrationSource``, ``target()`` makes a ``MigrationTarget`` that continues one, ``host()`` a
``TargetHost``. See docs/migrate.md ("vLLM engines"). The two sides live in
``fastckpt.migrate.vllm_sides``, the plain rules (sampling arguments, position-keyed rows) in
``fastckpt.migrate.vllm_params``; this module re-exports both.

How it maps onto vLLM (0.32, public engine API: ``add_request``, ``abort_request``, ``step``,
``RequestOutput``, prefix caching, custom logits processors):

- Source. ``snapshot`` reads the tokens delivered so far (the request keeps decoding with the
  rest of the batch). ``freeze`` stops delivering at once: tokens vLLM makes after it are held
  back, not sent; ``unfreeze`` sends them and goes on, so a migration that is rolled back leaves
  the stream exactly as if it had never been tried. ``release`` aborts the request in vLLM.
- Target. ``prefill`` runs the state's tokens up to the last KV block boundary through vLLM as
  a one-token request and drops it: with prefix caching on, those blocks stay in vLLM's cache,
  so each round computes only the blocks its new tokens complete (a partial block would not be
  cached, so it is left to the commit; ``rounds`` records what vLLM reported as cached).
  ``commit`` adds the request again with all its tokens as the prompt and
  the generation budget that is left; vLLM finds the blocks in its cache, computes the tail and
  continues, and the target emits ``generated[delivered:]`` and then vLLM's new tokens under
  their indices in the whole generation.
- Between rounds the target's blocks are free-but-cached: vLLM may evict them under memory
  pressure, and the commit then recomputes more. The tokens never depend on it.

Sampling (what continues exactly on another engine):

- greedy: exact (vLLM's argmax of the same logits; recompute changes floating-point order, see
  docs/migrate.md for the tie caveat in low precision).
- ``rng="position"`` (default for sampled requests): exact. vLLM's own seeded sampling cannot
  continue elsewhere, so the draw is fastckpt's: ``fastckpt.migrate.vllm_sampler.PositionSampler``
  (a vLLM logits processor, installed by ``from_args``) picks the token at absolute position p
  from ``step_seed(seed, p)`` on the raw logits and vLLM takes it greedily.
- ``rng="engine"``: vLLM's own sampler with ``SamplingParams.seed``; its per-request generator
  is seeded once and advanced at every step, and vLLM offers no way to start a request at a
  given generator position. Moved before its first token it continues exactly (the same seed
  starts the same stream); moved later, the continuation is seeded with ``step_seed(seed,
  position of the switch)``: a fresh stream, so the tokens after the switch are a sample of the
  same distribution, not the tokens an unmigrated run would have drawn.
- ``rng="generator"`` and stop strings are refused (no generator state to export; vLLM checks
  stop strings only in newly generated text, so one spanning the switch would be missed).

End of sequence is explicit: requests go to vLLM with ``ignore_eos=True`` and the state's
``stop_token_ids`` (add ``VllmEngine.eos_token_ids`` to stop at EOS), so source and target stop
on the same rule.

vLLM is imported when an engine is made; these modules import neither vLLM nor torch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from fastckpt.migrate.fingerprint import checkpoint_fingerprint
from fastckpt.migrate.remote import DEFAULT_LEASE_S, TargetHost
from fastckpt.migrate.state import SamplingParams, StopCriteria, TokenState
from fastckpt.migrate.vllm_params import (
    POSITION_SAMPLER,
    SAMPLING_KEY,
    PositionRows,
    continuation_seed,
    parse_position_sampling,
    position_sampling_spec,
    request_params,
)
from fastckpt.migrate.vllm_sides import Emit, VllmSource, VllmTarget, _Prefill, _Stream

DEFAULT_REQUEST_TIMEOUT_S = 600.0


def _vllm_sampling_params(params: dict[str, Any], final_only: bool) -> Any:
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
    return VllmSamplingParams(**params, output_kind=kind)


class VllmEngine:
    """One in-process vLLM engine whose requests can migrate in and out.

    The engine lives on a thread of its own: it is built there and every call into vLLM (add,
    abort, step) runs there, between steps. vLLM's CPU kernels size their work by the OpenMP
    threads of the thread that set them up, so one thread must drive the engine throughout.
    Outputs are handed to their requests on that thread too (emit callbacks run there).

    Args:
        make_engine: builds a vLLM V1 ``LLMEngine`` whose engine core runs in this process
            (``multiprocess_mode=False``); called once, on the engine thread. ``from_args``
            passes one.
        fingerprint: identity used to accept token states (``from_args``: the checkpoint's).
        request_timeout_s: how long a target's prefill waits for vLLM before it fails.
        startup_timeout_s: how long to wait for ``make_engine``.
        make_params: ``(keyword arguments, final_only) -> sampling parameters`` for
            ``add_request`` (default: ``vllm.SamplingParams`` with output kind ``DELTA``, or
            ``FINAL_ONLY`` for prefills); a seam for tests that drive a stand-in engine.

    The engine steps by itself after ``start_background()`` (whenever a request is
    unfinished), or when asked (``step``/``run``, and ``VllmSource.run``).
    """

    def __init__(
        self,
        make_engine: Callable[[], Any],
        *,
        fingerprint: str,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        startup_timeout_s: float = 1800.0,
        make_params: Callable[[dict[str, Any], bool], Any] | None = None,
    ) -> None:
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self.fingerprint = fingerprint
        self._make_params = make_params or _vllm_sampling_params
        self.request_timeout_s = request_timeout_s
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, _Stream] = {}  # vLLM request id -> receiver (engine thread)
        self._background = False
        self._failed: BaseException | None = None
        self._closed = False
        self._ids = itertools.count()
        self._engine: Any = None
        built: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(make_engine, built), name="vllm-migrate-engine", daemon=True
        )
        self._thread.start()
        built.result(startup_timeout_s)  # re-raises what make_engine raised
        engine: Any = self._engine
        config = engine.vllm_config
        self.max_model_len: int = int(config.model_config.max_model_len)
        self.block_size: int = int(config.cache_config.block_size)
        self.prefix_caching: bool = bool(config.cache_config.enable_prefix_caching)
        procs = config.model_config.logits_processors or []
        self.position_sampling: bool = any(
            p == POSITION_SAMPLER
            or (isinstance(p, type) and f"{p.__module__}:{p.__qualname__}" == POSITION_SAMPLER)
            for p in procs
        )

    @classmethod
    def from_args(
        cls,
        model: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        position_sampling: bool = True,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        **engine_args: Any,
    ) -> VllmEngine:
        """Build an in-process ``LLMEngine`` from ``vllm.EngineArgs(model, **engine_args)``.

        Prefix caching is on unless ``enable_prefix_caching=False`` is passed (a target needs
        it) and ``PositionSampler`` is installed unless ``position_sampling=False``. The engine
        core runs in this process; where the model runs is vLLM's choice (on CPU, a worker
        process unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The fingerprint defaults to
        ``checkpoint_fingerprint(model, dtype)`` of the local folder with the dtype vLLM
        resolved, so two engines built from the same folder and dtype agree.
        """
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        kw: dict[str, Any] = {"enable_prefix_caching": True, **engine_args}
        if position_sampling:
            procs = list(kw.get("logits_processors") or [])
            kw["logits_processors"] = [*procs, POSITION_SAMPLER]
        args = EngineArgs(model=os.fspath(model), **kw)
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        if fingerprint is None:
            if not os.path.isdir(os.fspath(model)):
                raise ValueError(
                    f"{os.fspath(model)!r} is not a local folder: pass fingerprint= (the same "
                    "on every engine serving this model)"
                )
            fingerprint = checkpoint_fingerprint(model, f"vllm:{config.model_config.dtype}")

        def make() -> Any:
            return LLMEngine(
                vllm_config=config,
                executor_class=Executor.get_class(config),
                log_stats=False,
                multiprocess_mode=False,
            )

        return cls(make, fingerprint=fingerprint, request_timeout_s=request_timeout_s)

    # --- the engine thread -----------------------------------------------------------------

    def _serve(self, make_engine: Callable[[], Any], built: Future[None]) -> None:
        try:
            self._engine = make_engine()
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(None)
        while True:
            busy = self._background and self._failed is None and self._has_work()
            try:
                job = self._jobs.get_nowait() if busy else self._jobs.get()
            except queue.Empty:
                with contextlib.suppress(BaseException):  # a failure is kept in _failed
                    self._step_here()
                continue
            if job is None:  # close()
                return
            fn, done = job
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

    def _has_work(self) -> bool:
        return bool(self._engine.has_unfinished_requests())

    def _call(self, fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Run ``fn`` on the engine thread (between two steps) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed:
            raise RuntimeError("the vLLM engine was closed")
        done: Future[Any] = Future()
        self._jobs.put((fn, done))
        return done.result(timeout_s)

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the vLLM engine failed: {self._failed}") from self._failed

    def _step_here(self) -> bool:
        """One engine step and its outputs handed out (on the engine thread)."""
        self._check_alive()
        if not self._has_work():
            return False
        try:
            outputs = self._engine.step()
        except BaseException as e:
            self._failed = e
            failed = list(self._streams.values())
            self._streams.clear()
            for stream in failed:
                stream.on_error(e)
            raise RuntimeError(f"the vLLM engine failed: {e}") from e
        for out in outputs:
            receiver = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if receiver is not None:
                receiver.on_output(out)
        return True

    # --- stepping ------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids (its config and generation config), for
        ``StopCriteria.stop_token_ids``."""
        mc = self._engine.model_config
        found: list[int] = []
        for value in (
            getattr(mc.hf_config, "eos_token_id", None),
            mc.try_get_generation_config().get("eos_token_id"),
        ):
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, int) and t not in found:
                    found.append(t)
        return tuple(found)

    def step(self) -> bool:
        """Run one engine step (not while ``start_background`` runs). Returns False when vLLM
        had nothing to do."""
        if self._background:
            raise RuntimeError("the engine is stepped by its background thread")
        return bool(self._call(self._step_here))

    def run(self, until: Callable[[], bool] | None = None, max_steps: int | None = None) -> int:
        """Step until ``until()`` is true, ``max_steps`` steps ran, or nothing is left; returns
        the steps run."""
        n = 0
        while (max_steps is None or n < max_steps) and not (until is not None and until()):
            if not self.step():
                break
            n += 1
        return n

    def start_background(self) -> VllmEngine:
        """Step whenever a request is unfinished, until ``stop_background()`` or ``close()``."""

        def on() -> None:
            self._background = True

        self._call(on)
        return self

    def stop_background(self) -> None:
        """Stop stepping by itself (after the current step); the caller steps from now on."""

        def off() -> None:
            self._background = False

        if not self._closed:
            self._call(off)

    def close(self, timeout_s: float = 30.0) -> None:
        """Abort what is still running (its waiters are told) and stop the engine thread."""
        if self._closed:
            return

        def shut() -> list[_Stream]:
            self._background = False
            streams = dict(self._streams)
            self._streams.clear()
            if streams and self._failed is None:
                with contextlib.suppress(Exception):
                    self._engine.abort_request(list(streams))
            return list(streams.values())

        streams = self._call(shut, timeout_s)
        self._closed = True
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:  # closed from an emit callback
            self._thread.join(timeout_s)
        closed = RuntimeError("the vLLM engine was closed")
        for s in streams:
            s.on_error(closed)

    # --- requests ------------------------------------------------------------------------

    def _new_id(self, kind: str, request_id: str) -> str:
        return f"{request_id}@{kind}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    def _submit(
        self,
        stream: _Stream,
        vllm_id: str,
        tokens: Sequence[int],
        params: dict[str, Any],
        *,
        final_only: bool = False,
    ) -> None:
        """Add a request to vLLM; its outputs go to ``stream``. Never call it holding a
        request's lock: the engine thread takes those locks to hand out outputs."""
        sp = self._make_params(params, final_only)

        def add() -> None:
            self._check_alive()
            if vllm_id in self._streams:
                raise ValueError(f"request id {vllm_id!r} is already running on this engine")
            (prompt,) = self._engine.renderer.render_cmpl([{"prompt_token_ids": list(tokens)}])
            self._engine.add_request(vllm_id, prompt, sp)
            self._streams[vllm_id] = stream

        self._call(add)

    def _abort(self, vllm_id: str) -> None:
        """Abort a vLLM request (no more outputs reach its stream). Same rule as ``_submit``."""

        def abort() -> None:
            if self._streams.pop(vllm_id, None) is not None and self._failed is None:
                self._engine.abort_request([vllm_id])

        if not self._closed:
            self._call(abort)

    def check_request(self, state: TokenState) -> dict[str, Any]:
        """Raise ``ValueError`` if this engine cannot run ``state``; else the vLLM sampling
        keyword arguments that continue it."""
        need = len(state.prompt_ids) + state.stop.max_new_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"request {state.request_id!r} needs {need} positions ({len(state.prompt_ids)} "
                f"prompt + {state.stop.max_new_tokens} new tokens) but this engine's "
                f"max_model_len is {self.max_model_len}"
            )
        return request_params(state, position_sampling=self.position_sampling)

    def start(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        stop: StopCriteria,
        emit: Emit | None = None,
    ) -> VllmSource:
        """Add a generation to vLLM (it decodes as the engine steps); it is a migration source."""
        src = VllmSource(self, request_id, tuple(prompt_ids), sampling or SamplingParams(), stop)
        src.emit = emit
        src.begin()
        return src

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        stop: StopCriteria,
        timeout_s: float | None = None,
    ) -> list[int]:
        """Generate without migrating (the reference output), stepping the engine if no
        background thread does."""
        src = self.start(f"local-{uuid.uuid4().hex[:8]}", prompt_ids, sampling=sampling, stop=stop)
        if not self._background:
            self.run(until=lambda: src.finished)
        src.wait(timeout_s)
        return list(src.generated)

    def prefill(self, tokens: Sequence[int]) -> int:
        """Compute the KV cache of ``tokens`` as a one-token request and drop it (its whole
        blocks stay in the prefix cache); returns how many tokens vLLM found cached. The engine
        must be stepping (``start_background``). The recompute benchmark times this."""
        job = _Prefill(self._new_id("prefill", "measure"))
        job.run(self, tokens)
        return int(job.cached_tokens or 0)

    def target(self, request_id: str, *, emit: Emit | None = None) -> VllmTarget:
        """A target for request ``request_id`` (needs prefix caching; see the module docstring)."""
        if not self.prefix_caching:
            raise ValueError(
                "a vLLM migration target needs enable_prefix_caching=True: without it every "
                "round's prefill is thrown away and the commit recomputes the whole context"
            )
        return VllmTarget(self, request_id, emit)

    def host(self, *, lease_s: float = DEFAULT_LEASE_S) -> TargetHost:
        """A ``TargetHost`` serving this engine's targets (start its reaper for leases)."""
        return TargetHost(lambda rid: self.target(rid), lease_s=lease_s)


__all__ = [
    "POSITION_SAMPLER",
    "SAMPLING_KEY",
    "PositionRows",
    "VllmEngine",
    "VllmSource",
    "VllmTarget",
    "continuation_seed",
    "parse_position_sampling",
    "position_sampling_spec",
    "request_params",
]
