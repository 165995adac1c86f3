"""The vLLM adapter without vLLM: which vLLM sampling parameters continue a token state, the
batch-row bookkeeping of the position sampler, the server's vLLM options, and ``VllmEngine``'s
own logic driven over a stand-in engine (tests/migrate/fake_vllm.py). Migrations between real
vLLM engines run in tests/vllm_migrate (their own CI step)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_vllm import FakeLLMEngine, LocalTransport, make_params
from migrate_helpers import Client, pace

from fastckpt.migrate import (
    ModelMismatchError,
    Outcome,
    RemoteTarget,
    SamplingParams,
    SourceStateError,
    StopCriteria,
    TargetStateError,
    TokenState,
    TokenStateError,
    migrate,
)
from fastckpt.migrate.serve import main as serve_main
from fastckpt.migrate.vllm import (
    SAMPLING_KEY,
    PositionRows,
    VllmEngine,
    continuation_seed,
    parse_position_sampling,
    position_sampling_spec,
    request_params,
)


def _state(sampling: SamplingParams, generated: tuple[int, ...] = (), **stop: object) -> TokenState:
    return TokenState(
        request_id="r",
        model_fingerprint="m",
        prompt_ids=(1, 2, 3),
        generated_ids=generated,
        sampling=sampling,
        stop=StopCriteria(**{"max_new_tokens": 10, "stop_token_ids": (2,), **stop}),  # type: ignore[arg-type]
        delivered=len(generated),
    )


def test_greedy_continues_with_the_budget_that_is_left() -> None:
    kw = request_params(_state(SamplingParams(), (5, 6, 7)), position_sampling=False)
    assert kw == {
        "max_tokens": 7,
        "stop_token_ids": [2],
        "ignore_eos": True,  # end of sequence is the state's stop ids, the same on both sides
        "detokenize": False,
        "temperature": 0.0,
    }


def test_position_sampling_is_sent_as_greedy_with_the_draw_rule() -> None:
    s = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=42)
    kw = request_params(_state(s, (5,)), position_sampling=True)
    assert kw["temperature"] == 0.0
    assert kw["extra_args"] == {
        SAMPLING_KEY: {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 42}
    }
    assert parse_position_sampling(kw["extra_args"][SAMPLING_KEY]) == s
    with pytest.raises(ValueError, match="PositionSampler"):
        request_params(_state(s), position_sampling=False)


def test_engine_rng_starts_with_the_seed_and_resumes_on_a_fresh_stream() -> None:
    s = SamplingParams(temperature=1.0, top_k=3, seed=7, rng="engine")
    fresh = request_params(_state(s), position_sampling=True)
    assert (fresh["seed"], fresh["temperature"], fresh["top_k"]) == (7, 1.0, 3)
    resumed = request_params(_state(s, (5, 6)), position_sampling=True)
    assert resumed["seed"] == continuation_seed(7, 5) != 7  # keyed by where it resumed
    again = request_params(_state(s, (5, 6)), position_sampling=True)
    assert again["seed"] == resumed["seed"]  # a retried commit continues the same way
    assert request_params(_state(s, (5, 6, 8)), position_sampling=True)["seed"] != resumed["seed"]


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (_state(SamplingParams(temperature=1.0, rng="generator")), "generator"),
        (_state(SamplingParams(), stop_strings=("end",)), "stop strings"),
        (_state(SamplingParams(), tuple(range(10))), "no tokens left"),
    ],
)
def test_what_cannot_move_is_refused(state: TokenState, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        request_params(state, position_sampling=True)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("x", "mapping"),
        ({"temperature": 1.0, "top_k": 0, "top_p": 1.0}, "missing"),
        ({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1, "x": 2}, "unknown"),
        ({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": -1}, "seed"),
        ({"temperature": float("nan"), "top_k": 0, "top_p": 1.0, "seed": 1}, "temperature"),
    ],
)
def test_malformed_sampling_spec_is_refused(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_position_sampling(spec)


def test_position_rows_follow_vllm_batch_updates() -> None:
    a = SamplingParams(temperature=1.0, seed=1)
    b = SamplingParams(temperature=0.5, seed=2)
    out_a: list[int] = []
    out_b: list[int] = [9, 9]
    rows = PositionRows()
    rows.update([], [(0, position_sampling_spec(a), [1, 2, 3], out_a), (1, None, [4], [])], [])
    rows.update([], [(2, position_sampling_spec(b), [5], out_b)], [])
    assert sorted(rows.positions()) == [(0, a, 3), (2, b, 3)]
    out_a.append(7)  # vLLM appends to its own list; the position follows
    assert (0, a, 4) in rows.positions()
    rows.update([], [], [(0, 1, True)])  # swap rows 0 and 1 (1 is not ours)
    assert sorted(rows.positions()) == [(1, a, 4), (2, b, 3)]
    rows.update([], [], [(2, 0, False)])  # move row 2 to 0
    assert sorted(rows.positions()) == [(0, b, 3), (1, a, 4)]
    rows.update([1], [(0, None, [1], [])], [])  # row 1 removed; row 0 reused by another
    assert list(rows.positions()) == [] and len(rows) == 0
    with pytest.raises(ValueError, match="prompt token ids"):
        rows.update([], [(0, position_sampling_spec(a), None, [])], [])
    with pytest.raises(TokenStateError):
        rows.update([], [(0, {"temperature": -1, "top_k": 0, "top_p": 1, "seed": 0}, [1], [])], [])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vllm-arg", "max_model_len=64"], "--vllm-arg needs --engine vllm"),
        (["--engine", "vllm", "--background-load"], "not supported with --engine vllm"),
        (["--engine", "vllm", "--vllm-arg", "oops"], "KEY=VALUE"),
    ],
)
def test_serve_refuses_bad_vllm_options(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        serve_main(["--model", "/nonexistent", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# --- VllmEngine's own logic on a stand-in engine (fake_vllm.FakeLLMEngine) ---------------------

FAKE_PROMPT = tuple(range(5, 19))  # 14 tokens: three whole blocks of 4 and a partial one
FAKE_STOP = StopCriteria(max_new_tokens=16)
PACES = {0: [], 1: [2], 3: [4, 4, 1]}


def _fake_engine(fake: FakeLLMEngine, **kw: Any) -> VllmEngine:
    return VllmEngine(lambda: fake, fingerprint="fake-model", make_params=make_params, **kw)


@pytest.fixture
def engines() -> Iterator[tuple[VllmEngine, FakeLLMEngine, VllmEngine, FakeLLMEngine]]:
    src_fake, tgt_fake = FakeLLMEngine(), FakeLLMEngine()
    src, tgt = _fake_engine(src_fake), _fake_engine(tgt_fake).start_background()
    try:
        yield src, src_fake, tgt, tgt_fake
    finally:
        src.close()
        tgt.close()


@pytest.mark.parametrize("rounds", [0, 1, 3])
@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=1.0, seed=9)],
    ids=["greedy", "position"],
)
def test_migration_through_a_host_equals_unmigrated(
    engines: Any, sampling: SamplingParams, rounds: int
) -> None:
    src_engine, src_fake, tgt_engine, tgt_fake = engines
    expected = src_engine.generate(FAKE_PROMPT, sampling=sampling, stop=FAKE_STOP)
    client = Client()
    src = src_engine.start("r", FAKE_PROMPT, sampling=sampling, stop=FAKE_STOP, emit=client.emit)
    src.run(3)
    host = tgt_engine.host()
    remote = RemoteTarget(LocalTransport(host), "r")
    kw: dict[str, Any] = {"threshold_tokens": 3, "after_round": pace(src, PACES[rounds])}
    if rounds == 0:
        kw["max_rounds"] = 0
    report = migrate(src, remote, **kw)
    assert report.outcome is Outcome.COMMITTED and report.rounds == rounds
    result = host.handle({"op": "result", "request_id": "r", "timeout_s": 30}, b"")[0]
    client.add(result["tokens"])
    assert client.output() == expected
    # vLLM's calls all came from one thread per engine, neither of them this one
    assert len(src_fake.threads) == 1 and len(tgt_fake.threads) == 1
    assert threading.get_ident() not in src_fake.threads | tgt_fake.threads
    # prefills ran only for whole blocks, the commit found them cached
    computed = 0
    for r in result["rounds"]:
        assert r["computed_to"] % 4 == 0 and r["computed_to"] >= computed
        computed = r["computed_to"]
    assert result["commit_cached_tokens"] >= computed
    prefills = [rid for rid in tgt_fake.added if "@prefill" in rid]
    assert len(prefills) == sum(1 for r in result["rounds"] if "cached_tokens" in r)


def test_a_round_that_completes_no_block_runs_nothing_in_vllm(engines: Any) -> None:
    src_engine, _, tgt_engine, tgt_fake = engines
    src = src_engine.start("r", FAKE_PROMPT, stop=FAKE_STOP)
    src.run(1)  # 15 tokens: blocks up to 12
    target = tgt_engine.target("r")
    assert target.prefill(src.snapshot()) == 15
    src.run(1)  # 16 tokens: a fourth whole block
    assert target.prefill(src.snapshot()) == 16
    src.run(2)  # 18 tokens: still four
    assert target.prefill(src.snapshot()) == 18
    assert [(r["tokens"], r["computed_to"], r.get("cached_tokens")) for r in target.rounds] == [
        (15, 12, 0),
        (1, 16, 12),
        (2, 16, None),
    ]
    assert sum(1 for rid in tgt_fake.added if "@prefill" in rid) == 2


def test_engine_seeded_sampling_continues_on_a_fresh_stream(engines: Any) -> None:
    src_engine, _, tgt_engine, _ = engines
    s = SamplingParams(temperature=1.0, seed=11, rng="engine")
    expected = src_engine.generate(FAKE_PROMPT, sampling=s, stop=FAKE_STOP)
    for begin, exact in ((0, True), (5, False)):
        client = Client()
        src = src_engine.start(
            f"e{begin}", FAKE_PROMPT, sampling=s, stop=FAKE_STOP, emit=client.emit
        )
        src.run(begin)
        target = tgt_engine.target(f"e{begin}")
        assert migrate(src, target, max_rounds=0).outcome is Outcome.COMMITTED
        target.wait(30)
        client.add([list(p) for p in target.emitted])
        out = client.output()
        assert out[:begin] == expected[:begin]
        assert (out == expected) is exact


def test_source_engine_failure_is_a_source_failure(engines: Any) -> None:
    src_engine, src_fake, tgt_engine, _ = engines
    src = src_engine.start("r", FAKE_PROMPT, stop=FAKE_STOP)
    src.run(2)
    target = tgt_engine.target("r")

    def fail(info: Any) -> None:
        src_fake.fail_next_step = True
        with pytest.raises(RuntimeError, match="injected"):
            src.run(1)

    report = migrate(src, target, threshold_tokens=0, after_round=fail)
    assert report.outcome is Outcome.SOURCE_FAILED and "engine failed" in (report.error or "")
    assert target.status() == "aborted" and target.covered == 0
    assert src.wait(5)  # nobody waits forever on a lost generation
    with pytest.raises(RuntimeError, match="failed"):
        src_engine.start("next", FAKE_PROMPT, stop=FAKE_STOP)


def test_abort_stops_a_prefill_that_waits_for_the_engine() -> None:
    fake = FakeLLMEngine()
    engine = _fake_engine(fake)  # not stepping: the prefill waits
    try:
        state = TokenState("r", "fake-model", FAKE_PROMPT, (), SamplingParams(), FAKE_STOP)
        target = engine.target("r")
        errors: list[BaseException] = []

        def prefill() -> None:
            try:
                target.prefill(state)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=prefill)
        t.start()
        deadline = time.monotonic() + 10
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(fake.requests) == 1
        assert target.abort() is True
        t.join(10)
        assert not t.is_alive() and isinstance(errors[0], TargetStateError)
        assert "aborted" in str(errors[0]) and not fake.requests  # vLLM's request is gone
        with pytest.raises(TargetStateError, match="aborted"):
            target.prefill(state)
    finally:
        engine.close()


def test_frozen_source_holds_tokens_back(engines: Any) -> None:
    src_engine, src_fake, _, _ = engines
    expected = src_engine.generate(FAKE_PROMPT, stop=FAKE_STOP)
    client = Client()
    src = src_engine.start("r", FAKE_PROMPT, stop=FAKE_STOP, emit=client.emit)
    src.run(3)
    frozen = src.freeze()
    with pytest.raises(SourceStateError, match="frozen"):
        src.run(1)
    src_engine.run(max_steps=4)
    assert src.snapshot() == frozen and len(client.tokens) == 3
    src.unfreeze()
    assert len(client.tokens) == 7
    src.run()
    assert client.output() == expected
    other = src_engine.start("o", FAKE_PROMPT, stop=FAKE_STOP)
    other.run(1)
    other.release()
    assert other.wait(0) and not src_fake.requests


def test_requests_the_target_cannot_run_are_refused() -> None:
    fake = FakeLLMEngine(max_model_len=20)
    engine = _fake_engine(fake)
    try:
        assert engine.eos_token_ids == (2, 3)
        with pytest.raises(ValueError, match="max_model_len is 20"):
            engine.start("r", FAKE_PROMPT, stop=FAKE_STOP)
        state = TokenState("r", "fake-model", FAKE_PROMPT, (), SamplingParams(), FAKE_STOP)
        with pytest.raises(ValueError, match="max_model_len"):
            engine.target("r").prefill(state)
        with pytest.raises(ModelMismatchError):
            engine.target("r").prefill(state.replace(model_fingerprint="other"))
        fake.vllm_config.cache_config.enable_prefix_caching = False
        no_cache = _fake_engine(fake)
        with pytest.raises(ValueError, match="enable_prefix_caching"):
            no_cache.target("r")
        no_cache.close()
    finally:
        engine.close()


def test_a_committed_target_whose_engine_fails_is_failed(engines: Any) -> None:
    src_engine, _, tgt_engine, tgt_fake = engines
    src = src_engine.start("r", FAKE_PROMPT, stop=FAKE_STOP)
    src.run(2)
    host = tgt_engine.host()
    remote = RemoteTarget(LocalTransport(host), "r")
    tgt_fake.fail_with = "@continue"  # the step that continues the committed request
    assert migrate(src, remote, max_rounds=0).outcome is Outcome.COMMITTED
    result = remote.result(timeout_s=30)
    assert result["finished"] and result["finish_reason"] == "error"
    assert "injected: the engine failed" in result["error"]
    assert remote.status()["status"] == "failed"
