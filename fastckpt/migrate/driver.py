"""The round driver: move one generation from a source to a target, losing and repeating no token.

Rounds (pre-copy, after live VM migration): the target prefills the whole context while the source
keeps decoding; each further round prefills only the tokens the source produced meanwhile. When a
round would have at most ``threshold_tokens`` new tokens (default 20), or after ``max_rounds``
rounds, the source freezes at a step boundary, the target prefills the last gap and commits, and
the source releases the request. Downtime is freeze to commit.

Every failure is an explicit ``Outcome`` in the report, never a half-moved request:

- ``COMMITTED``: the target owns the request; the source released it.
- ``TARGET_FAILED``: the target failed before committing (prefill or commit raised, the model did
  not match, ...). The target was told to abort and the source continues (unfrozen if it was
  frozen) as if nothing happened.
- ``FINISHED_ON_SOURCE``: the generation ended on the source before the switch; the target was
  told to abort (freed), the source delivers the end as usual.
- ``SOURCE_FAILED``: the source raised (it is lost). The target is told to abort; if that cannot
  reach it, its lease frees it.
- ``COMMIT_UNKNOWN``: commit raised, retries and abort could not reach the target, so whether it
  committed is unknown. The source is left frozen; the caller asks the target (its status) and
  then calls ``release()`` or ``unfreeze()`` on the source. Never both sides decode.

A failed commit is disambiguated by ``abort()``: commit is idempotent and abort refuses (returns
False) once the target committed, so "the commit happened but its reply was lost" is recognised
and reported as ``COMMITTED`` instead of letting the source decode a second copy.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastckpt.migrate.protocol import MigrationSource, MigrationTarget

DEFAULT_THRESHOLD_TOKENS = 20
DEFAULT_MAX_ROUNDS = 8


class Outcome(str, enum.Enum):
    COMMITTED = "committed"
    TARGET_FAILED = "target_failed"
    FINISHED_ON_SOURCE = "finished_on_source"
    SOURCE_FAILED = "source_failed"
    COMMIT_UNKNOWN = "commit_unknown"


@dataclass(frozen=True)
class RoundInfo:
    """Handed to the ``after_round`` hook: the round just done (1-based) and its new tokens."""

    round: int
    new_tokens: int
    covered_tokens: int


@dataclass(frozen=True)
class MigrationReport:
    """What happened. Times are seconds of ``time.monotonic``.

    Attributes:
        outcome: see ``Outcome``.
        request_id: the request moved (None when no snapshot could be taken).
        rounds: catch-up rounds run while the source kept decoding.
        tokens_per_round: new tokens prefilled in each of those rounds (the first is the context).
        final_tokens: tokens prefilled during the downtime (the gap left at the freeze).
        context_tokens: prompt + generated tokens at the freeze (or at the last snapshot).
        downtime_s: freeze to commit (or to unfreeze when the migration was rolled back); None
            when the source was never frozen.
        total_s: from the start of ``migrate`` to its end.
        commit_attempts: how many times commit was called.
        error: the exception that decided a failure outcome, as ``"Class: message"``.
    """

    outcome: Outcome
    request_id: str | None
    rounds: int
    tokens_per_round: tuple[int, ...]
    final_tokens: int
    context_tokens: int
    downtime_s: float | None
    total_s: float
    commit_attempts: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome.value,
            "request_id": self.request_id,
            "rounds": self.rounds,
            "tokens_per_round": list(self.tokens_per_round),
            "final_tokens": self.final_tokens,
            "context_tokens": self.context_tokens,
            "downtime_s": self.downtime_s,
            "total_s": self.total_s,
            "commit_attempts": self.commit_attempts,
            "error": self.error,
        }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _try_abort(target: MigrationTarget) -> bool | None:
    """abort() -> True/False, or None when abort itself failed (target unreachable)."""
    try:
        return bool(target.abort())
    except Exception:
        return None


def migrate(
    source: MigrationSource,
    target: MigrationTarget,
    *,
    threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    commit_retries: int = 2,
    after_round: Callable[[RoundInfo], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> MigrationReport:
    """Move one generation from ``source`` to ``target``; see the module docstring.

    Args:
        source, target: the two sides (``MigrationSource``, ``MigrationTarget``).
        threshold_tokens: freeze once a round would prefill at most this many new tokens.
        max_rounds: at most this many catch-up rounds before freezing (0: freeze at once, i.e.
            stop-and-copy: the whole context is prefilled during the downtime).
        commit_retries: extra commit attempts after a failed one (commit is idempotent).
        after_round: called after each catch-up round (tests use it to pace a source that
            decodes only when told; engines can log progress).
        clock: the time source of the report.

    Returns:
        A ``MigrationReport``. Failures are outcomes, not exceptions; the only exceptions raised
        are for invalid arguments.
    """
    if threshold_tokens < 0:
        raise ValueError(f"threshold_tokens must be >= 0, got {threshold_tokens}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    if commit_retries < 0:
        raise ValueError(f"commit_retries must be >= 0, got {commit_retries}")

    t0 = clock()
    per_round: list[int] = []
    covered = 0
    request_id: str | None = None
    context = 0

    def report(
        outcome: Outcome,
        *,
        final: int = 0,
        downtime: float | None = None,
        attempts: int = 0,
        error: BaseException | None = None,
    ) -> MigrationReport:
        return MigrationReport(
            outcome=outcome,
            request_id=request_id,
            rounds=len(per_round),
            tokens_per_round=tuple(per_round),
            final_tokens=final,
            context_tokens=context,
            downtime_s=downtime,
            total_s=clock() - t0,
            commit_attempts=attempts,
            error=None if error is None else _describe(error),
        )

    # --- catch-up rounds: the source keeps decoding ----------------------------------------
    while True:
        try:
            state = source.snapshot()
        except Exception as e:
            _try_abort(target)
            return report(Outcome.SOURCE_FAILED, error=e)
        request_id = state.request_id
        context = len(state.tokens)
        if state.finished:
            _try_abort(target)
            return report(Outcome.FINISHED_ON_SOURCE)
        gap = context - covered
        if len(per_round) >= max_rounds or (per_round and gap <= threshold_tokens):
            break
        try:
            covered = target.prefill(state)
        except Exception as e:
            _try_abort(target)
            return report(Outcome.TARGET_FAILED, error=e)
        per_round.append(gap)
        if after_round is not None:
            after_round(RoundInfo(len(per_round), gap, covered))

    # --- downtime: freeze, last gap, commit ----------------------------------------------
    try:
        final = source.freeze()
    except Exception as e:
        _try_abort(target)
        return report(Outcome.SOURCE_FAILED, error=e)
    t_freeze = clock()
    context = len(final.tokens)
    final_gap = context - covered

    def roll_back(error: BaseException | None, outcome: Outcome, attempts: int) -> MigrationReport:
        try:
            source.unfreeze()
        except Exception as e:  # the source is gone: nothing decodes this request any more
            return report(
                Outcome.SOURCE_FAILED,
                final=final_gap,
                downtime=clock() - t_freeze,
                attempts=attempts,
                error=e,
            )
        return report(
            outcome, final=final_gap, downtime=clock() - t_freeze, attempts=attempts, error=error
        )

    if final.finished:
        _try_abort(target)
        return roll_back(None, Outcome.FINISHED_ON_SOURCE, 0)
    try:
        if final_gap > 0:
            covered = target.prefill(final)
    except Exception as e:
        _try_abort(target)
        return roll_back(e, Outcome.TARGET_FAILED, 0)

    attempts = 0
    last_error: BaseException | None = None
    committed = False
    while attempts <= commit_retries:
        attempts += 1
        try:
            target.commit(final)
        except Exception as e:
            last_error = e
            continue
        committed = True
        break
    if not committed:
        aborted = _try_abort(target)
        if aborted is None:
            return report(
                Outcome.COMMIT_UNKNOWN,
                final=final_gap,
                downtime=None,
                attempts=attempts,
                error=last_error,
            )
        if aborted:
            return roll_back(last_error, Outcome.TARGET_FAILED, attempts)
        # abort refused: the target had committed and only the reply was lost
    t_commit = clock()
    try:
        source.release()
    except Exception as e:  # the target owns the request; the frozen source emits nothing more
        last_error = e
    return report(
        Outcome.COMMITTED,
        final=final_gap,
        downtime=t_commit - t_freeze,
        attempts=attempts,
        error=last_error,
    )


__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_THRESHOLD_TOKENS",
    "MigrationReport",
    "Outcome",
    "RoundInfo",
    "migrate",
]
