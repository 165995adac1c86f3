"""Live migration between vLLM engines: both migration sides over vLLM's ``LLMEngine``.

``VllmEngine`` owns one vLLM V1 ``LLMEngine`` with its engine core in this process, on a thread
of its own that builds it and makes every call into it; it steps by itself or when told. Every
request it runs is served by continuous batching as usual; ``start()`` begins one that is also
a ``MigrationSource``, ``target()`` makes a ``MigrationTarget`` that continues one, ``host()`` a
``TargetHost``. See docs/migrate.md ("vLLM engines").

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

vLLM is imported when an engine is made; this module itself imports neither vLLM nor torch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from fastckpt.migrate.errors import LeaseExpiredError, SourceStateError, TargetStateError
from fastckpt.migrate.fingerprint import checkpoint_fingerprint
from fastckpt.migrate.remote import DEFAULT_LEASE_S, TargetHost
from fastckpt.migrate.state import (
    RNG_ENGINE,
    RNG_GENERATOR,
    RNG_POSITION,
    SamplingParams,
    StopCriteria,
    TokenState,
    step_seed,
)

SAMPLING_KEY = "fastckpt_sampling"
POSITION_SAMPLER = "fastckpt.migrate.vllm_sampler:PositionSampler"
DEFAULT_REQUEST_TIMEOUT_S = 600.0

Emit = Callable[[int, int], None]  # (index among generated tokens, token id)

# --- plain rules (no vLLM needed) ---------------------------------------------------------------


def position_sampling_spec(sampling: SamplingParams) -> dict[str, Any]:
    """What ``PositionSampler`` reads from ``extra_args[SAMPLING_KEY]``."""
    return {
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }


def parse_position_sampling(spec: Any) -> SamplingParams:
    """The ``SamplingParams`` of an ``extra_args[SAMPLING_KEY]`` value; ``ValueError``
    (``TokenStateError``) naming the field when it is malformed."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"extra_args[{SAMPLING_KEY!r}] must be a mapping, got {spec!r}")
    keys = ("temperature", "top_k", "top_p", "seed")
    unknown = sorted(set(spec) - set(keys))
    missing = [k for k in keys if k not in spec]
    if unknown or missing:
        raise ValueError(
            f"extra_args[{SAMPLING_KEY!r}] needs exactly {list(keys)}; "
            f"missing {missing}, unknown {unknown}"
        )
    return SamplingParams(**{k: spec[k] for k in keys}, rng=RNG_POSITION)


def continuation_seed(seed: int, position: int) -> int:
    """vLLM seed of a ``rng="engine"`` request resumed at absolute ``position`` (a fresh stream,
    the same for every resumption of the same state)."""
    return step_seed(seed, position)


def request_params(state: TokenState, *, position_sampling: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` that continue ``state`` (or start it, when
    nothing is generated yet), less ``output_kind``.

    Raises ``ValueError`` for what cannot move between vLLM engines (see the module docstring).
    """
    s = state.sampling
    stop = state.stop
    if stop.stop_strings:
        raise ValueError(
            "stop strings are not supported by the vLLM migration adapter (vLLM checks them only "
            "in newly generated text, so one spanning the switch would be missed)"
        )
    remaining = stop.max_new_tokens - len(state.generated_ids)
    if remaining < 1:
        raise ValueError(f"request {state.request_id!r} has no tokens left to generate")
    kw: dict[str, Any] = {
        "max_tokens": remaining,
        "stop_token_ids": list(stop.stop_token_ids),
        "ignore_eos": True,
        "detokenize": False,
        "temperature": 0.0,
    }
    if s.greedy:
        return kw
    if s.rng == RNG_POSITION:
        if not position_sampling:
            raise ValueError(
                "rng='position' needs the PositionSampler logits processor on this engine "
                f"(EngineArgs(logits_processors=[{POSITION_SAMPLER!r}]); VllmEngine.from_args "
                "installs it)"
            )
        kw["extra_args"] = {SAMPLING_KEY: position_sampling_spec(s)}
        return kw
    if s.rng == RNG_ENGINE:
        seed = s.seed if not state.generated_ids else continuation_seed(s.seed, len(state.tokens))
        kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed)
        return kw
    assert s.rng == RNG_GENERATOR
    raise ValueError(
        "rng='generator' cannot run on vLLM: its per-request generator state cannot be read "
        "out or restored; use rng='position' (exact) or rng='engine'"
    )


class PositionRows:
    """Which rows of vLLM's persistent batch draw by position, and the position of each.

    ``update`` takes a batch update as plain data, in vLLM's order (removed, added, moved):
    removed row indices; added ``(row, spec or None, prompt ids, live output ids)``; moved
    ``(from, to, swap)``. The output list is vLLM's own, so the position stays current.
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[SamplingParams, int, Sequence[int]]] = {}

    def update(
        self,
        removed: Sequence[int],
        added: Sequence[tuple[int, Any, Sequence[int] | None, Sequence[int]]],
        moved: Sequence[tuple[int, int, bool]],
    ) -> None:
        for row in removed:
            self._rows.pop(row, None)
        for row, spec, prompt, output in added:
            if spec is None:
                self._rows.pop(row, None)
                continue
            if prompt is None:
                raise ValueError("position-keyed sampling needs prompt token ids")
            self._rows[row] = (parse_position_sampling(spec), len(prompt), output)
        for a, b, swap in moved:
            at_a = self._rows.pop(a, None)
            at_b = self._rows.pop(b, None)
            if at_a is not None:
                self._rows[b] = at_a
            if swap and at_b is not None:
                self._rows[a] = at_b

    def positions(self) -> Iterator[tuple[int, SamplingParams, int]]:
        """``(row, sampling, absolute position of the token to draw)`` per tracked row."""
        for row, (sampling, prompt_len, output) in self._rows.items():
            yield row, sampling, prompt_len + len(output)

    def __len__(self) -> int:
        return len(self._rows)


# --- the engine ------------------------------------------------------------------------------


class _Stream:
    """Receives one vLLM request's outputs (the engine calls these outside its own lock)."""

    def on_output(self, output: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_error(self, error: BaseException) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _vllm_sampling_params(params: dict[str, Any], final_only: bool) -> Any:
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
    return VllmSamplingParams(**params, output_kind=kind)


def _finish_reason(output: Any) -> str | None:
    if not output.finished:
        return None
    reason = output.outputs[0].finish_reason if output.outputs else None
    return {"stop": "stop_token", "length": "length", "abort": "aborted", None: "aborted"}.get(
        reason, str(reason)
    )


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


# --- the two sides -----------------------------------------------------------------------------


class _Generation(_Stream):
    """Tokens of one generation as the client sees them: generated ids, delivery, the end."""

    def __init__(self, engine: VllmEngine, request_id: str, emit: Emit | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.emit = emit
        self.lock = threading.Condition(threading.RLock())
        self.prompt: tuple[int, ...] = ()
        self.generated: list[int] = []
        self.delivered = 0
        self.emitted: list[tuple[int, int]] = []
        self.emit_times: list[float] = []  # time.monotonic() of each emitted token
        self.sampling = SamplingParams()
        self.stop = StopCriteria(max_new_tokens=1)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # the engine failure that ended it, if any
        self.vllm_id: str | None = None  # the live vLLM request, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _deliver(self) -> None:
        while self.delivered < len(self.generated):
            i = self.delivered
            self.delivered += 1
            self.emitted.append((i, self.generated[i]))
            self.emit_times.append(time.monotonic())
            if self.emit is not None:
                self.emit(i, self.generated[i])

    def _take(self, tokens: Sequence[int], finish: str | None) -> None:
        """Append vLLM's new tokens, deliver them, record the end (caller holds the lock)."""
        self.generated.extend(tokens)
        self._deliver()
        if finish is not None:
            self.finish_reason = finish
            self.vllm_id = None
            self.lock.notify_all()

    def on_error(self, error: BaseException) -> None:
        with self.lock:
            if not self.finished:
                self.finish_reason = "error"
                self.error = error
                self.vllm_id = None
            self.lock.notify_all()

    def _ended(self) -> bool:
        """Nothing more will be emitted here (caller holds the lock)."""
        return self.finished

    def state(self) -> TokenState:
        return TokenState(
            request_id=self.request_id,
            model_fingerprint=self.engine.fingerprint,
            prompt_ids=self.prompt,
            generated_ids=tuple(self.generated),
            sampling=self.sampling,
            stop=self.stop,
            delivered=self.delivered,
            finished=self.finished,
            finish_reason=self.finish_reason,
        )

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing more will be emitted here; True when so."""
        with self.lock:
            return self.lock.wait_for(self._ended, timeout_s)

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        self.wait(timeout_s)
        with self.lock:
            out: dict[str, Any] = {
                "tokens": [list(p) for p in self.emitted],
                "finished": self.finished,
                "finish_reason": self.finish_reason,
                "emit_times": list(self.emit_times),
            }
            if self.error is not None:  # the generation failed here (finish_reason "error")
                out["error"] = f"{type(self.error).__name__}: {self.error}"
            return out


class VllmSource(_Generation):
    """A generation running on a ``VllmEngine`` (``MigrationSource``); made by ``start``."""

    def __init__(
        self,
        engine: VllmEngine,
        request_id: str,
        prompt_ids: tuple[int, ...],
        sampling: SamplingParams,
        stop: StopCriteria,
    ) -> None:
        super().__init__(engine, request_id, None)
        self.prompt = prompt_ids
        self.sampling = sampling
        self.stop = stop
        self.frozen = False
        self.released = False
        self._held: list[int] = []  # made by vLLM while frozen, not delivered
        self._held_finish: str | None = None

    def begin(self) -> None:
        params = self.engine.check_request(self.state())  # validates before vLLM sees it
        vllm_id = self.engine._new_id("source", self.request_id)
        with self.lock:
            self.vllm_id = vllm_id
        self.engine._submit(self, vllm_id, self.prompt, params)

    def on_output(self, output: Any) -> None:
        tokens = list(output.outputs[0].token_ids) if output.outputs else []
        finish = _finish_reason(output)
        with self.lock:
            if self.released or self.finished:
                return
            if self.frozen:
                self._held.extend(tokens)
                self._held_finish = finish or self._held_finish
                return
            self._take(tokens, finish)

    def run(self, max_tokens: int | None = None) -> int:
        """Step the engine (all its requests) until this generation has ``max_tokens`` more
        tokens or ends; returns how many it got. For engines without a background thread."""
        with self.lock:
            if self.released:
                raise SourceStateError(f"request {self.request_id!r} was released")
            if self.frozen:
                raise SourceStateError(f"request {self.request_id!r} is frozen for migration")
            start = len(self.generated)
        goal = math.inf if max_tokens is None else start + max_tokens
        self.engine.run(until=lambda: self.finished or len(self.generated) >= goal)
        return len(self.generated) - start

    def _ended(self) -> bool:
        return self.finished or self.released

    def _check_live(self) -> None:
        if self.released:
            raise SourceStateError(f"request {self.request_id!r} was released")
        if self.error is not None:  # the engine failed: the generation is lost, not finished
            raise SourceStateError(f"request {self.request_id!r}: the engine failed: {self.error}")

    # --- MigrationSource -----------------------------------------------------------------

    def snapshot(self) -> TokenState:
        with self.lock:
            self._check_live()
            return self.state()

    def freeze(self) -> TokenState:
        with self.lock:
            self._check_live()
            self.frozen = True
            return self.state()

    def unfreeze(self) -> None:
        with self.lock:
            self._check_live()
            self.frozen = False
            held, self._held = self._held, []
            finish, self._held_finish = self._held_finish, None
            if not self.finished:
                self._take(held, finish)

    def release(self) -> None:
        with self.lock:
            self.released = True
            vllm_id, self.vllm_id = self.vllm_id, None
            self._held = []
            self.lock.notify_all()
        if vllm_id is not None:
            self.engine._abort(vllm_id)


class _Prefill(_Stream):
    """One round's prefill request: done when vLLM finishes it."""

    def __init__(self, vllm_id: str) -> None:
        self.vllm_id = vllm_id
        self.done = threading.Event()
        self.cached_tokens: int | None = None
        self.error: BaseException | None = None

    def on_output(self, output: Any) -> None:
        if output.finished:
            self.cached_tokens = output.num_cached_tokens
            if _finish_reason(output) == "aborted":
                self.error = RuntimeError("vLLM aborted the prefill request")
            self.done.set()

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def run(self, engine: VllmEngine, tokens: Sequence[int]) -> None:
        """Add the request, wait until vLLM finished it (or it was stopped); raises what went
        wrong."""
        engine._submit(
            self,
            self.vllm_id,
            tokens,
            {"max_tokens": 1, "temperature": 0.0, "detokenize": False},
            final_only=True,
        )
        if not self.done.wait(engine.request_timeout_s):
            engine._abort(self.vllm_id)
            raise TimeoutError(f"vLLM did not finish the prefill in {engine.request_timeout_s} s")
        if self.error is not None:
            raise self.error


class VllmTarget(_Generation):
    """The receiving side of one migration on a ``VllmEngine`` (``MigrationTarget``, and a
    ``HostedTarget`` for ``TargetHost``). Made by ``VllmEngine.target``.

    ``rounds`` lists, per prefill, ``{"tokens": new tokens taken, "computed_to": tokens whose KV
    blocks vLLM has computed for it}``, and when it ran a vLLM request, ``"cached_tokens"``
    (what vLLM found in its prefix cache) and ``"s"`` (seconds); ``commit_cached_tokens`` is
    what vLLM found cached for the commit.
    """

    def __init__(self, engine: VllmEngine, request_id: str, emit: Emit | None) -> None:
        super().__init__(engine, request_id, emit)
        self._status = "empty"
        self._covered: tuple[int, ...] = ()  # tokens taken from the source
        self._computed = 0  # of which vLLM computed (whole KV blocks) in prefill requests
        self._committed_state: TokenState | None = None
        self._inflight: _Prefill | None = None
        self._committing = False
        self.rounds: list[dict[str, Any]] = []
        self.commit_cached_tokens: int | None = None

    @property
    def committed(self) -> bool:
        with self.lock:
            return self._committed_state is not None

    @property
    def covered(self) -> int:
        with self.lock:
            return len(self._covered)

    def status(self) -> str:
        with self.lock:
            if self._status == "committed" and self.finished:
                return "failed" if self.error is not None else "finished"
            return self._status

    def _check_open(self) -> None:
        if self._status == "expired":
            raise LeaseExpiredError(f"request {self.request_id!r}: the lease expired")
        if self._status == "aborted":
            raise TargetStateError(f"request {self.request_id!r} was aborted on this target")

    def _check_state(self, state: TokenState) -> dict[str, Any]:
        if state.request_id != self.request_id:
            raise TargetStateError(
                f"target for {self.request_id!r} got the state of {state.request_id!r}"
            )
        state.check_model(self.engine.fingerprint)
        if state.finished:
            raise TargetStateError(f"request {self.request_id!r} has already finished")
        have = self._covered
        if len(state.tokens) < len(have) or state.tokens[: len(have)] != have:
            raise TargetStateError(
                f"request {self.request_id!r}: the new state does not extend the "
                f"{len(have)} tokens already prefilled"
            )
        return self.engine.check_request(state)

    def prefill(self, state: TokenState) -> int:
        """Take the state's new tokens; compute the KV blocks they complete.

        vLLM's prefix cache keeps whole KV blocks only, so a partial last block computed now
        would be computed again by the next request: the target computes up to the last block
        boundary (one vLLM request, waited for) and leaves the rest to the next round or the
        commit. Returns the tokens taken, which the source need not send again."""
        with self.lock:
            self.lock.wait_for(lambda: not self._committing)
            self._check_open()
            if self._committed_state is not None:
                raise TargetStateError(f"request {self.request_id!r} is already committed")
            if self._inflight is not None:
                raise TargetStateError(f"request {self.request_id!r}: a prefill is running")
            self._check_state(state)
            self._status = "prefilling"
            new = len(state.tokens) - len(self._covered)
            upto = len(state.tokens) // self.engine.block_size * self.engine.block_size
            if upto <= self._computed:  # no new whole block: nothing worth computing now
                self._covered = state.tokens
                self.rounds.append({"tokens": new, "computed_to": self._computed})
                return len(self._covered)
            job = _Prefill(self.engine._new_id("prefill", self.request_id))
            self._inflight = job
        t0 = time.monotonic()
        try:
            job.run(self.engine, state.tokens[:upto])
        except Exception as e:
            with self.lock:
                self._check_open()  # aborted or expired while vLLM worked: say that
            raise TargetStateError(f"request {self.request_id!r}: prefill failed: {e}") from e
        finally:
            with self.lock:
                self._inflight = None
        with self.lock:
            self._check_open()  # aborted or expired while vLLM worked
            self._covered = state.tokens
            self._computed = upto
            self.rounds.append(
                {
                    "tokens": new,
                    "computed_to": upto,
                    "cached_tokens": job.cached_tokens,
                    "s": time.monotonic() - t0,
                }
            )
            return len(self._covered)

    def commit(self, state: TokenState) -> None:
        with self.lock:
            self.lock.wait_for(lambda: not self._committing)
            done = self._committed_state
            if done is not None:
                if done == state:
                    return  # idempotent: the same commit again
                raise TargetStateError(
                    f"request {self.request_id!r} was committed with another state"
                )
            self._check_open()
            if self._inflight is not None:
                raise TargetStateError(f"request {self.request_id!r}: a prefill is running")
            params = self._check_state(state)
            # ready to receive vLLM's tokens before the request exists there
            self.prompt = state.prompt_ids
            self.generated = list(state.generated_ids)
            self.delivered = state.delivered
            self.sampling = state.sampling
            self.stop = state.stop
            self.vllm_id = self.engine._new_id("continue", self.request_id)
            self._committing = True
            vllm_id = self.vllm_id
        try:
            self.engine._submit(self, vllm_id, state.tokens, params)
        except BaseException:
            with self.lock:
                self._committing = False
                self.vllm_id = None
                self.generated, self.delivered = [], 0
                self.lock.notify_all()
            raise
        with self.lock:
            self._committing = False
            self._covered = state.tokens
            self._committed_state = state
            self._status = "committed"
            self._deliver()  # generated[delivered:] first (if vLLM's tokens did not already)
            self.lock.notify_all()

    def on_output(self, output: Any) -> None:
        tokens = list(output.outputs[0].token_ids) if output.outputs else []
        with self.lock:
            if self.finished:
                return
            if self.commit_cached_tokens is None:
                self.commit_cached_tokens = output.num_cached_tokens
            self._take(tokens, _finish_reason(output))

    def _close(self, status: str) -> bool:
        """Abort or expire: free what was reserved unless committed; False when committed."""
        with self.lock:
            self.lock.wait_for(lambda: not self._committing)
            if self._committed_state is not None:
                return False
            if self._status not in ("aborted", "expired"):
                self._status = status
            job = self._inflight
            if job is not None:  # the waiting prefill fails at once
                job.error = TargetStateError(f"request {self.request_id!r} was {self._status}")
                job.done.set()
            self._covered, self._computed = (), 0
        if job is not None:
            self.engine._abort(job.vllm_id)
        return True

    def abort(self) -> bool:
        return self._close("aborted")

    def expire(self) -> None:
        self._close("expired")

    def cancel(self) -> None:
        """Stop a committed generation early (the client went away)."""
        with self.lock:
            if self._committed_state is None or self.finished:
                return
            vllm_id, self.vllm_id = self.vllm_id, None
            self.finish_reason = "cancelled"
            self.lock.notify_all()
        if vllm_id is not None:
            self.engine._abort(vllm_id)

    def _ended(self) -> bool:
        return self.finished or (self._committed_state is None and not self._committing)

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        out = super().result(timeout_s)
        with self.lock:
            out["rounds"] = [dict(r) for r in self.rounds]
            out["commit_cached_tokens"] = self.commit_cached_tokens
        return out


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
