"""The vLLM adapter's rules that need no vLLM: which vLLM sampling parameters continue a token
state, the batch-row bookkeeping of the position sampler, and the server's vLLM options. The
migrations themselves run against vLLM in tests/vllm_migrate (their own CI step)."""

from __future__ import annotations

import pytest

from fastckpt.migrate import SamplingParams, StopCriteria, TokenState, TokenStateError
from fastckpt.migrate.serve import main as serve_main
from fastckpt.migrate.vllm import (
    SAMPLING_KEY,
    PositionRows,
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
