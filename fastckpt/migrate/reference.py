"""Reference engine adapter: both migration sides over a transformers causal LM and its KV cache.

This is the test vehicle and the worked example for engine authors. An engine holds one model;
``start()`` begins a generation that is also a ``MigrationSource``, ``target()`` makes a
``MigrationTarget`` that continues one. Decoding is one sequence at a time (batch size 1) with
the model's own cache (``past_key_values``); the target rebuilds its cache by prefilling the
state's tokens in chunks, one chunk per round.

What an engine author must copy from it:

- Step boundaries: every decode step (sample, emit, feed the token) runs under the request's
  lock, so ``snapshot``/``freeze`` always see a consistent state.
- Sampling by position: the token at absolute position p is drawn from a generator seeded with
  ``step_seed(seed, p)`` (on the CPU), by inverse CDF over the probabilities in token-id order,
  so source and target make the same draw from (almost) the same logits. With
  ``rng="generator"`` the request owns one generator whose state travels in the token state.
- Delivery: ``delivered`` counts the generated tokens the client got; the target emits
  ``generated[delivered:]`` first, then its own tokens, so each token reaches the client once.

The model may be given as a model object, a zero-argument callable that returns it, or a future
(anything with ``.result()``, e.g. what a prefetching fastckpt Loader returns, or a
``concurrent.futures.Future``). Callables and futures are resolved on a background thread from
the moment the engine is made, so a target can accept a migration and overlap loading its
weights with the source's catch-up rounds: the first prefill waits for the model, not the whole
migration. Pass ``fingerprint=`` (e.g. ``checkpoint_fingerprint(path)``) to check token states
before the model has arrived.

torch is imported when this module is used (here and, through it, in ``sampling`` and
``fingerprint``); transformers only through ``fastckpt.load_model``. The rest of
``fastckpt.migrate`` imports neither.

Why one module of this size: it is the documentation for engine authors, so both sides over
one model (forward, KV cache, background load) stay readable in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fastckpt.migrate.errors import LeaseExpiredError, SourceStateError, TargetStateError
from fastckpt.migrate.fingerprint import checkpoint_fingerprint, model_fingerprint
from fastckpt.migrate.remote import DEFAULT_LEASE_S, TargetHost
from fastckpt.migrate.sampling import choose_token, generator_state, new_generator
from fastckpt.migrate.state import (
    RNG_GENERATOR,
    SamplingParams,
    StopCriteria,
    TokenState,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

Emit = Callable[[int, int], None]  # (index among generated tokens, token id)


log = logging.getLogger("fastckpt.migrate")


class _ModelHandle:
    """A model now, or later: resolves a callable or future on a background thread."""

    def __init__(self, model: Any) -> None:
        self._model: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        if hasattr(model, "result") and callable(model.result):
            self._start(model.result)
        elif callable(model) and not hasattr(model, "forward"):
            self._start(model)
        else:
            self._model = model
            self._ready.set()

    def _start(self, produce: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                self._model = produce()
            except BaseException as e:  # surfaced to whoever waits for the model
                self._error = e
            finally:
                self._ready.set()

        threading.Thread(target=run, name="migrate-model-load", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def get(self) -> Any:
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the model could not be loaded: {self._error}") from self._error
        return self._model


class _Sequence:
    """One request's tokens, KV cache and last logits on an engine (caller holds the lock)."""

    def __init__(self, engine: ReferenceEngine) -> None:
        self.engine = engine
        self.tokens: list[int] = []
        self.cache: Any = None
        self.logits: Any = None
        # per sampled step: (top-1 minus top-2 logit, top-1 logit, top-1 id, top-2 id)
        self.margins: list[tuple[float, float, int, int]] = []

    def feed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        import torch

        model = self.engine.model
        cache_kw, extra = self.engine.forward_keywords
        with torch.inference_mode():
            inp = torch.tensor([list(ids)], dtype=torch.long, device=self.engine.device)
            out = model(input_ids=inp, use_cache=True, **{cache_kw: self.cache}, **extra)
        self.cache = getattr(out, cache_kw)
        self.logits = out.logits[0, -1]
        self.tokens.extend(ids)

    def sample(self, sampling: SamplingParams, generator: torch.Generator | None) -> int:
        import torch

        if self.engine.record_margins:
            top2 = torch.topk(self.logits.float(), 2)
            v, i = top2.values.tolist(), top2.indices.tolist()
            self.margins.append((v[0] - v[1], v[0], int(i[0]), int(i[1])))
        return choose_token(self.logits, sampling, len(self.tokens), generator)

    def free(self) -> None:
        self.cache = None
        self.logits = None


def _stop_reason(
    engine: ReferenceEngine, stop: StopCriteria, generated: Sequence[int]
) -> str | None:
    if generated and generated[-1] in stop.stop_token_ids:
        return "stop_token"
    if stop.stop_strings:
        assert engine.detokenize is not None
        text = engine.detokenize(list(generated))
        if any(s in text for s in stop.stop_strings):
            return "stop_string"
    if len(generated) >= stop.max_new_tokens:
        return "length"
    return None


class _Generation:
    """Decoding state shared by source and target: generated ids, delivery, stop, the RNG."""

    def __init__(self, engine: ReferenceEngine, request_id: str, emit: Emit | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.emit = emit
        self.lock = threading.Condition(threading.RLock())
        self.seq = _Sequence(engine)
        self.prompt: tuple[int, ...] = ()
        self.generated: list[int] = []
        self.delivered = 0
        self.emitted: list[tuple[int, int]] = []
        self.emit_times: list[float] = []  # time.monotonic() of each emitted token
        self.sampling = SamplingParams()
        self.stop = StopCriteria(max_new_tokens=1)
        self.generator: torch.Generator | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the generation failed (finish_reason "error")
        self.thread: threading.Thread | None = None

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

    def _step(self) -> int:
        """Sample one token, deliver it, feed it (unless the generation just ended)."""
        tok = self.seq.sample(self.sampling, self.generator)
        self.generated.append(tok)
        self._deliver()
        self.finish_reason = _stop_reason(self.engine, self.stop, self.generated)
        if self.finished:
            self.seq.free()
        else:
            self.seq.feed([tok])
        return tok

    def state(self) -> TokenState:
        s = self.sampling
        if s.rng == RNG_GENERATOR:
            s = dataclasses.replace(s, generator_state=generator_state(self.generator))
        return TokenState(
            request_id=self.request_id,
            model_fingerprint=self.engine.fingerprint,
            prompt_ids=self.prompt,
            generated_ids=tuple(self.generated),
            sampling=s,
            stop=self.stop,
            delivered=self.delivered,
            finished=self.finished,
            finish_reason=self.finish_reason,
        )

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        t = self.thread
        if t is not None:
            t.join(timeout_s)
        with self.lock:
            out: dict[str, Any] = {
                "tokens": [list(p) for p in self.emitted],
                "finished": self.finished,
                "finish_reason": self.finish_reason,
                "emit_times": list(self.emit_times),
            }
            if self.error is not None:
                out["error"] = self.error
            return out

    @property
    def margins(self) -> list[tuple[float, float, int, int]]:
        return list(self.seq.margins)


class ReferenceSource(_Generation):
    """A generation on the source engine (``MigrationSource``). Made by ``ReferenceEngine.start``.

    Decode with ``step()`` / ``run()`` (the caller's thread) or ``start_background()`` (a thread
    that decodes until the generation ends, pausing while frozen, stopping at release).
    """

    def __init__(
        self,
        engine: ReferenceEngine,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopCriteria,
        emit: Emit | None,
    ) -> None:
        super().__init__(engine, request_id, emit)
        self.prompt = tuple(prompt_ids)
        self.sampling = sampling
        self.stop = stop
        self.frozen = False
        self.released = False
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.generator = new_generator(sampling)
        self.state()  # validates the request before any work
        engine.check_stop(stop)

    def _check_can_decode(self) -> None:
        if self.released:
            raise SourceStateError(f"request {self.request_id!r} was released (migrated away)")
        if self.frozen:
            raise SourceStateError(f"request {self.request_id!r} is frozen for migration")

    def step(self) -> int | None:
        """Decode one token; None when the generation has already ended."""
        with self.lock:
            self._check_can_decode()
            if self.finished:
                return None
            if self.seq.logits is None:
                self.seq.feed(self.prompt)
            return self._step()

    def run(self, max_steps: int | None = None) -> int:
        """Decode up to ``max_steps`` tokens (all when None); returns how many were decoded."""
        n = 0
        while (max_steps is None or n < max_steps) and self.step() is not None:
            n += 1
        return n

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the background decode thread to stop; True when it has."""
        t = self.thread
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    @contextlib.contextmanager
    def _boundary(self) -> Iterator[None]:
        """Hold the request at a step boundary (the decode thread yields to waiting callers)."""
        with self._pending_lock:
            self._pending += 1
        try:
            with self.lock:
                yield
                self.lock.notify_all()
        finally:
            with self._pending_lock:
                self._pending -= 1

    def start_background(self) -> ReferenceSource:
        def loop() -> None:
            while True:
                with self.lock:
                    while (self.frozen or self._pending) and not self.released:
                        self.lock.wait(0.01)
                    if self.released or self.finished:
                        return
                    self.step()
                    self.lock.notify_all()

        self.thread = threading.Thread(target=loop, name=f"decode-{self.request_id}", daemon=True)
        self.thread.start()
        return self

    # --- MigrationSource -------------------------------------------------------------------

    def snapshot(self) -> TokenState:
        with self._boundary():
            if self.released:
                raise SourceStateError(f"request {self.request_id!r} was released")
            return self.state()

    def freeze(self) -> TokenState:
        with self._boundary():
            if self.released:
                raise SourceStateError(f"request {self.request_id!r} was released")
            self.frozen = True
            return self.state()

    def unfreeze(self) -> None:
        with self._boundary():
            if self.released:
                raise SourceStateError(f"request {self.request_id!r} was released")
            self.frozen = False
            self.lock.notify_all()

    def release(self) -> None:
        with self._boundary():
            self.released = True
            self.seq.free()
            self.lock.notify_all()


class ReferenceTarget(_Generation):
    """The receiving side of one migration (``MigrationTarget``). Made by
    ``ReferenceEngine.target``; also a ``HostedTarget`` so a ``TargetHost`` can serve it."""

    def __init__(
        self, engine: ReferenceEngine, request_id: str, emit: Emit | None, background: bool
    ) -> None:
        super().__init__(engine, request_id, emit)
        self._status = "empty"
        self._committed_state: TokenState | None = None
        self._background = background

    @property
    def committed(self) -> bool:
        with self.lock:
            return self._committed_state is not None

    @property
    def covered(self) -> int:
        with self.lock:
            return len(self.seq.tokens)

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

    def prefill(self, state: TokenState) -> int:
        with self.lock:
            self._check_open()
            if self._status == "committed":
                raise TargetStateError(f"request {self.request_id!r} is already committed")
            if state.request_id != self.request_id:
                raise TargetStateError(
                    f"target for {self.request_id!r} got the state of {state.request_id!r}"
                )
            state.check_model(self.engine.fingerprint)
            if state.finished:
                raise TargetStateError(f"request {self.request_id!r} has already finished")
            have = self.seq.tokens
            if len(state.tokens) < len(have) or tuple(have) != state.tokens[: len(have)]:
                raise TargetStateError(
                    f"request {self.request_id!r}: the new state does not extend the "
                    f"{len(have)} tokens already prefilled"
                )
            self.engine.check_stop(state.stop)
            self.prompt = state.prompt_ids
            self._status = "prefilling"
            self.seq.feed(state.tokens[len(have) :])
            return len(self.seq.tokens)

    def commit(self, state: TokenState) -> None:
        with self.lock:
            done = self._committed_state
            if done is not None:
                if done == state:
                    return  # idempotent: the same commit again
                raise TargetStateError(
                    f"request {self.request_id!r} was committed with another state"
                )
            self.prefill(state)
            self.generated = list(state.generated_ids)
            self.delivered = state.delivered
            self.sampling = state.sampling
            self.stop = state.stop
            self.generator = new_generator(state.sampling)
            self._committed_state = state
            self._status = "committed"
        if self._background:
            self.thread = threading.Thread(
                target=self.run, name=f"continue-{self.request_id}", daemon=True
            )
            self.thread.start()

    def run(self) -> None:
        """Continue the committed generation to its end (emit the undelivered tokens first)."""
        with self.lock:
            if self._committed_state is None:
                raise TargetStateError(f"request {self.request_id!r} is not committed")
            self._deliver()
        while True:
            with self.lock:
                if self.finished or self._status != "committed":
                    return
                try:
                    self._step()
                except Exception as e:
                    # a decode error ends the generation as failed: the cache goes now, the
                    # reason is what result() and status() report, the host reaps it later
                    self.error = f"{type(e).__name__}: {e}"
                    self.finish_reason = "error"
                    self.seq.free()
                    if not self._background:
                        raise
                    log.warning("request %r failed on this target: %s", self.request_id, e)
                    return

    def cancel(self) -> None:
        """Stop a committed generation early (the client went away); frees the cache."""
        with self.lock:
            if self._committed_state is not None and not self.finished:
                self.finish_reason = "cancelled"
                self.seq.free()

    def abort(self) -> bool:
        with self.lock:
            if self._committed_state is not None:
                return False
            if self._status not in ("aborted", "expired"):
                self._status = "aborted"
            self.seq.free()
            self.seq.tokens = []
            return True

    def expire(self) -> None:
        with self.lock:
            if self._committed_state is None:
                self._status = "expired"
                self.seq.free()
                self.seq.tokens = []


class ReferenceEngine:
    """One transformers causal LM serving generations that can migrate in and out.

    Args:
        model: the model, a zero-argument callable returning it, or a future (``.result()``);
            see the module docstring.
        fingerprint: identity used to accept token states (default: ``model_fingerprint`` of
            the model, computed once it is loaded).
        device: where inputs go (default: the device of the model's first parameter).
        record_margins: record the top-1 minus top-2 logit of every sampled step (diagnostics;
            the bfloat16 tie test uses it).
        detokenize: ids -> text, needed for stop strings.
    """

    def __init__(
        self,
        model: Any,
        *,
        fingerprint: str | None = None,
        device: Any = None,
        record_margins: bool = False,
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        self._handle = _ModelHandle(model)
        self._fingerprint = fingerprint
        self._device = device
        self.record_margins = record_margins
        self.detokenize = detokenize
        self._lock = threading.Lock()
        self._forward_kw: tuple[str, dict[str, Any]] | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        background: bool = False,
        fingerprint: str | None = None,
        record_margins: bool = False,
        detokenize: Callable[[list[int]], str] | None = None,
        **load_kwargs: Any,
    ) -> ReferenceEngine:
        """An engine over ``fastckpt.load_model(path, **load_kwargs)``.

        The fingerprint defaults to ``checkpoint_fingerprint(path, dtype)``, known before the
        weights, so both sides of a migration loaded from the same checkpoint agree. With
        ``background=True`` the model loads on a thread while the engine already accepts
        migrations (the first prefill waits for it)."""
        import fastckpt

        def load() -> Any:
            return fastckpt.load_model(path, **load_kwargs)

        fp = fingerprint or checkpoint_fingerprint(path, load_kwargs.get("dtype"))
        return cls(
            load if background else load(),
            fingerprint=fp,
            record_margins=record_margins,
            detokenize=detokenize,
        )

    @property
    def model(self) -> Any:
        return self._handle.get()

    @property
    def model_ready(self) -> bool:
        return self._handle.ready

    @property
    def device(self) -> Any:
        if self._device is None:
            self._device = next(self.model.parameters()).device
        return self._device

    @property
    def forward_keywords(self) -> tuple[str, dict[str, Any]]:
        """The model's name for its KV cache argument (``cache`` in transformers 5.x,
        ``past_key_values`` before) and extra forward arguments (only the last logits)."""
        if self._forward_kw is None:
            params = inspect.signature(self.model.forward).parameters
            cache_kw = "cache" if "cache" in params else "past_key_values"
            extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
            self._forward_kw = (cache_kw, extra)
        return self._forward_kw

    @property
    def fingerprint(self) -> str:
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(self.model)
            return self._fingerprint

    def check_stop(self, stop: StopCriteria) -> None:
        if stop.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer: pass detokenize= to the engine")

    def start(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        stop: StopCriteria,
        emit: Emit | None = None,
    ) -> ReferenceSource:
        """Begin a generation (nothing is decoded until ``step``/``run``/``start_background``)."""
        return ReferenceSource(
            self, request_id, prompt_ids, sampling or SamplingParams(), stop, emit
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        stop: StopCriteria,
    ) -> list[int]:
        """Generate without migrating: the reference output."""
        src = self.start("local", prompt_ids, sampling=sampling, stop=stop)
        src.run()
        return list(src.generated)

    def target(
        self, request_id: str, *, emit: Emit | None = None, background: bool = True
    ) -> ReferenceTarget:
        """A target for request ``request_id``; after commit it decodes on a thread
        (``background``) or when ``run()`` is called."""
        return ReferenceTarget(self, request_id, emit, background)

    def host(self, *, lease_s: float = DEFAULT_LEASE_S) -> TargetHost:
        """A ``TargetHost`` serving this engine's targets (start its reaper for leases)."""
        return TargetHost(lambda rid: self.target(rid), lease_s=lease_s)


__all__ = [
    "ReferenceEngine",
    "ReferenceSource",
    "ReferenceTarget",
    "checkpoint_fingerprint",
    "choose_token",
    "model_fingerprint",
]
