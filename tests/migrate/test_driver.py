"""The round driver against in-memory sides (no model): rounds, threshold, cap, every outcome."""

from __future__ import annotations

from typing import Any

import pytest

from fastckpt.migrate import (
    MigrationSource,
    MigrationTarget,
    Outcome,
    RoundInfo,
    SamplingParams,
    StopCriteria,
    TokenState,
    migrate,
)


class FakeSource:
    def __init__(self, prompt: int = 50, generated: int = 0, max_new: int = 1000) -> None:
        self.prompt = tuple(range(1, prompt + 1))
        self.generated: list[int] = [7] * generated
        self.max_new = max_new
        self.frozen = False
        self.released = False
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.finish_at_freeze = False

    def decode(self, n: int) -> None:
        assert not self.frozen and not self.released
        self.generated += [9] * min(n, self.max_new - len(self.generated))

    def _state(self, finished: bool = False) -> TokenState:
        return TokenState(
            request_id="r",
            model_fingerprint="m",
            prompt_ids=self.prompt,
            generated_ids=tuple(self.generated),
            sampling=SamplingParams(),
            stop=StopCriteria(max_new_tokens=self.max_new),
            delivered=len(self.generated),
            finished=finished or len(self.generated) >= self.max_new,
        )

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"source {name} failed")

    def snapshot(self) -> TokenState:
        self._call("snapshot")
        return self._state()

    def freeze(self) -> TokenState:
        self._call("freeze")
        self.frozen = True
        return self._state(self.finish_at_freeze)

    def unfreeze(self) -> None:
        self._call("unfreeze")
        self.frozen = False

    def release(self) -> None:
        self._call("release")
        self.released = True


class FakeTarget:
    def __init__(self) -> None:
        self.covered = 0
        self.committed: TokenState | None = None
        self.calls: list[str] = []
        self.fail_prefill_at: int | None = None
        self.commit_fails = 0
        self.commit_lands = False  # a failing commit still commits (its reply is lost)
        self.abort_fails = False
        self.prefills = 0

    def prefill(self, state: TokenState) -> int:
        self.calls.append("prefill")
        self.prefills += 1
        if self.prefills == self.fail_prefill_at:
            raise RuntimeError("prefill failed")
        self.covered = len(state.tokens)
        return self.covered

    def commit(self, state: TokenState) -> None:
        self.calls.append("commit")
        if self.commit_fails:
            self.commit_fails -= 1
            if self.commit_lands:
                self.committed = state
            raise RuntimeError("commit failed")
        assert self.covered == len(state.tokens) or self.committed == state
        self.committed = state

    def abort(self) -> bool:
        self.calls.append("abort")
        if self.abort_fails:
            raise ConnectionError("target unreachable")
        return self.committed is None


def pacer(src: FakeSource, per_round: list[int]) -> Any:
    def hook(info: RoundInfo) -> None:
        if info.round - 1 < len(per_round):
            src.decode(per_round[info.round - 1])

    return hook


def test_fakes_satisfy_the_protocols() -> None:
    assert isinstance(FakeSource(), MigrationSource)
    assert isinstance(FakeTarget(), MigrationTarget)


def test_rounds_stop_at_the_default_threshold() -> None:
    src, tgt = FakeSource(generated=5), FakeTarget()
    r = migrate(src, tgt, after_round=pacer(src, [30, 25, 20]))
    assert r.outcome is Outcome.COMMITTED
    assert r.tokens_per_round == (55, 30, 25)  # the 20 new tokens of round 4 are <= 20: freeze
    assert r.rounds == 3 and r.final_tokens == 20
    assert r.context_tokens == 130
    assert tgt.committed is not None and len(tgt.committed.tokens) == 130
    assert src.released and src.calls.count("freeze") == 1 and "unfreeze" not in src.calls


def test_round_cap() -> None:
    src, tgt = FakeSource(), FakeTarget()
    r = migrate(src, tgt, max_rounds=2, after_round=pacer(src, [50, 50, 50]))
    assert r.rounds == 2 and r.tokens_per_round == (50, 50) and r.final_tokens == 50
    assert r.outcome is Outcome.COMMITTED


def test_zero_rounds_is_stop_and_copy() -> None:
    src, tgt = FakeSource(generated=3), FakeTarget()
    r = migrate(src, tgt, max_rounds=0)
    assert r.rounds == 0 and r.final_tokens == 53 and r.outcome is Outcome.COMMITTED
    assert tgt.calls == ["prefill", "commit"]


def test_downtime_is_freeze_to_commit() -> None:
    ticks = iter(range(100))
    src, tgt = FakeSource(), FakeTarget()
    r = migrate(src, tgt, after_round=pacer(src, [5]), clock=lambda: float(next(ticks)))
    # clock reads: start, freeze, commit, total
    assert r.downtime_s == 1.0 and r.total_s == 3.0


def test_target_failing_mid_round_leaves_the_source_running() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.fail_prefill_at = 2
    r = migrate(src, tgt, after_round=pacer(src, [40, 40]))
    assert r.outcome is Outcome.TARGET_FAILED and "prefill failed" in (r.error or "")
    assert r.downtime_s is None and "freeze" not in src.calls
    assert tgt.calls[-1] == "abort"


def test_target_failing_in_the_downtime_unfreezes_the_source() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.fail_prefill_at = 2  # the final gap's prefill, after the freeze
    r = migrate(src, tgt, after_round=pacer(src, [5]))
    assert r.outcome is Outcome.TARGET_FAILED
    assert src.calls[-2:] == ["freeze", "unfreeze"] and not src.frozen and not src.released
    assert r.downtime_s is not None


def test_commit_retried_then_succeeds() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.commit_fails = 2
    r = migrate(src, tgt, commit_retries=2)
    assert r.outcome is Outcome.COMMITTED and r.commit_attempts == 3 and src.released


def test_commit_failure_rolls_back_when_the_target_aborts() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.commit_fails = 5
    r = migrate(src, tgt, commit_retries=1)
    assert r.outcome is Outcome.TARGET_FAILED and r.commit_attempts == 2
    assert not src.frozen and not src.released


def test_lost_commit_reply_is_recognised_by_the_refused_abort() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.commit_fails, tgt.commit_lands = 1, True
    r = migrate(src, tgt, commit_retries=0)
    assert r.outcome is Outcome.COMMITTED and src.released and not src.calls.count("unfreeze")


def test_unreachable_target_after_commit_leaves_the_source_frozen() -> None:
    src, tgt = FakeSource(), FakeTarget()
    tgt.commit_fails, tgt.abort_fails = 5, True
    r = migrate(src, tgt, commit_retries=1)
    assert r.outcome is Outcome.COMMIT_UNKNOWN
    assert src.frozen and not src.released  # neither side decodes until someone decides


def test_generation_finishing_during_the_rounds() -> None:
    src, tgt = FakeSource(max_new=30), FakeTarget()
    r = migrate(src, tgt, after_round=pacer(src, [100]))
    assert r.outcome is Outcome.FINISHED_ON_SOURCE
    assert tgt.calls == ["prefill", "abort"] and "freeze" not in src.calls


def test_generation_finishing_at_the_freeze() -> None:
    src, tgt = FakeSource(), FakeTarget()
    src.finish_at_freeze = True
    r = migrate(src, tgt)
    assert r.outcome is Outcome.FINISHED_ON_SOURCE
    assert src.calls[-1] == "unfreeze" and tgt.calls[-1] == "abort" and tgt.committed is None


def test_finished_before_the_first_round() -> None:
    src, tgt = FakeSource(generated=10, max_new=10), FakeTarget()
    r = migrate(src, tgt)
    assert r.outcome is Outcome.FINISHED_ON_SOURCE and r.rounds == 0


@pytest.mark.parametrize("where", ["snapshot", "freeze"])
def test_source_failure(where: str) -> None:
    src, tgt = FakeSource(), FakeTarget()
    src.fail.add(where)
    r = migrate(src, tgt)
    assert r.outcome is Outcome.SOURCE_FAILED and tgt.calls[-1] == "abort"
    assert tgt.committed is None


def test_report_as_dict() -> None:
    src, tgt = FakeSource(), FakeTarget()
    d = migrate(src, tgt).to_dict()
    assert d["outcome"] == "committed" and d["tokens_per_round"] == [50]


@pytest.mark.parametrize(
    "kw", [{"threshold_tokens": -1}, {"max_rounds": -1}, {"commit_retries": -1}]
)
def test_bad_arguments(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        migrate(FakeSource(), FakeTarget(), **kw)
