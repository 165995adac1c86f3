"""The two migration sides of a ``VllmEngine``: ``VllmSource`` and ``VllmTarget``.

Both are the receivers of their vLLM requests' outputs (``_Stream``), which the engine hands
them on its own thread, outside its lock; they never call into the engine holding their own
lock. How each maps onto vLLM is in ``fastckpt.migrate.vllm``'s docstring and docs/migrate.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastckpt.migrate.errors import LeaseExpiredError, SourceStateError, TargetStateError
from fastckpt.migrate.state import SamplingParams, StopCriteria, TokenState

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.migrate.vllm import VllmEngine

Emit = Callable[[int, int], None]  # (index among generated tokens, token id)


class _Stream:
    """Receives one vLLM request's outputs (the engine calls these outside its own lock)."""

    def on_output(self, output: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_error(self, error: BaseException) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _finish_reason(output: Any) -> str | None:
    if not output.finished:
        return None
    reason = output.outputs[0].finish_reason if output.outputs else None
    return {"stop": "stop_token", "length": "length", "abort": "aborted", None: "aborted"}.get(
        reason, str(reason)
    )


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


__all__ = ["Emit", "VllmSource", "VllmTarget"]
