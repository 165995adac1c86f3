"""Migrations between two processes: this one (source, client) and a target server process.

The model is a tiny random LlamaForCausalLM in float32 loaded with fastckpt.load_model on both
sides. A migrated generation must give the client exactly the tokens of an unmigrated one, each
once, for every migration point and round count, greedy and sampled, and under failures.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import migrate_scenarios as scenarios
from conftest import LEASE_S
from migrate_helpers import PROMPT, Client, MappedSource, drop_generator_state, pace
from migrate_scenarios import Pair, Run

from fastckpt.migrate import (
    Outcome,
    RemoteTarget,
    SamplingParams,
    SocketTransport,
    StopCriteria,
    migrate,
)

N = 16
STOP = StopCriteria(max_new_tokens=N)
THRESHOLD = 3
# tokens the source decodes after each catch-up round, for 0, 1 and several rounds
PACES = {0: [], 1: [2], 3: [4, 4, 1]}
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, seed=1234)
SAMPLED_GEN = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=99, rng="generator")

_reference: dict[SamplingParams, list[int]] = {}
_ids = iter(range(10**6))


def reference(engine: Any, sampling: SamplingParams) -> list[int]:
    if sampling not in _reference:
        _reference[sampling] = engine.generate(PROMPT, sampling=sampling, stop=STOP)
    return _reference[sampling]


def begin_at(point: str, rounds: int) -> int:
    """Tokens the source has decoded when the migration starts, for the migration point."""
    during = sum(PACES[rounds])
    return {"start": 0, "middle": N // 2 - during // 2, "end": N - 1 - during}[point]


def run_migration(
    engine: Any,
    server: Any,
    sampling: SamplingParams,
    begin: int,
    rounds: int,
    *,
    wrap_target: Any = None,
    wrap_source: Any = None,
    hook: Any = None,
    **kw: Any,
) -> Run:
    rid = f"req-{next(_ids)}"
    client = Client()
    src = engine.start(rid, PROMPT, sampling=sampling, stop=STOP, emit=client.emit)
    src.run(begin)
    transport = SocketTransport(server.host, server.port)
    remote = RemoteTarget(transport, rid)
    target = wrap_target(remote) if wrap_target else remote
    source = wrap_source(src) if wrap_source else src
    kw.setdefault("threshold_tokens", THRESHOLD)
    if rounds == 0:
        kw.setdefault("max_rounds", 0)
    after_round = hook(src) if hook else pace(src, PACES[rounds])
    report = migrate(source, target, after_round=after_round, **kw)
    if report.outcome is Outcome.COMMITTED:
        res = remote.result(timeout_s=60)
        assert res["finished"]
        client.add(res["tokens"])
    else:
        src.run()  # the source goes on as if nothing happened
    transport.close()
    return Run(report, client, src, remote)


@pytest.fixture
def pair(source_engine: Any, target_server: Any) -> Pair:
    return Pair(
        server=target_server,
        start=lambda rid, sampling, client: source_engine.start(
            rid, PROMPT, sampling=sampling, stop=STOP, emit=client.emit
        ),
        run_migration=lambda sampling, begin, rounds, **kw: run_migration(
            source_engine, target_server, sampling, begin, rounds, **kw
        ),
        reference=lambda sampling: reference(source_engine, sampling),
        prompt_len=len(PROMPT),
        max_new_tokens=N,
        lease_s=LEASE_S,
    )


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rounds", [0, 1, 3])
@pytest.mark.parametrize("point", ["start", "middle", "end"])
def test_migrated_equals_unmigrated(
    pair: Pair, source_engine: Any, sampling: SamplingParams, rounds: int, point: str
) -> None:
    begin = begin_at(point, rounds)
    run = pair.run_migration(sampling, begin, rounds)
    scenarios.check_migrated(pair, run, PACES[rounds], begin, rounds)
    assert run.client.output() == reference(source_engine, sampling)


@pytest.mark.parametrize("point", ["start", "end"])
def test_generator_state_shipping(source_engine: Any, target_server: Any, point: str) -> None:
    expected = reference(source_engine, SAMPLED_GEN)
    run = run_migration(source_engine, target_server, SAMPLED_GEN, begin_at(point, 1), 1)
    assert run.report.outcome is Outcome.COMMITTED
    assert run.client.output() == expected


def test_negative_control_without_sampling_state(source_engine: Any, target_server: Any) -> None:
    """Dropping the generator state on the way makes the continuation differ: the test above
    passes because the state travels, not by luck."""
    expected = reference(source_engine, SAMPLED_GEN)
    begin = begin_at("middle", 1)
    run = run_migration(
        source_engine,
        target_server,
        SAMPLED_GEN,
        begin,
        1,
        wrap_source=lambda s: MappedSource(s, drop_generator_state),
    )
    assert run.report.outcome is Outcome.COMMITTED
    out = run.client.output()
    switch = run.report.context_tokens - len(PROMPT)
    assert out[:switch] == expected[:switch]
    assert out[switch:] != expected[switch:]


def test_negative_control_other_seed(source_engine: Any, target_server: Any) -> None:
    """Position-keyed sampling: a target keyed by another seed continues differently."""
    from dataclasses import replace

    expected = reference(source_engine, SAMPLED)
    run = run_migration(
        source_engine,
        target_server,
        SAMPLED,
        begin_at("middle", 1),
        1,
        wrap_source=lambda s: MappedSource(
            s, lambda st: st.replace(sampling=replace(st.sampling, seed=st.sampling.seed + 1))
        ),
    )
    out = run.client.output()
    switch = run.report.context_tokens - len(PROMPT)
    assert out[:switch] == expected[:switch]
    assert out[switch:] != expected[switch:]


# --- failure injection: the client gets every token once, the output equals unmigrated ---------


@pytest.mark.parametrize("at", [1, 3])
def test_target_fails_mid_round(pair: Pair, at: int) -> None:
    scenarios.target_fails_mid_round(pair, SAMPLED, at)


def test_target_fails_at_commit(pair: Pair) -> None:
    scenarios.target_fails_at_commit(pair, GREEDY)


@pytest.mark.parametrize("retries", [0, 2])
def test_commit_reply_lost(pair: Pair, retries: int) -> None:
    scenarios.commit_reply_lost(pair, SAMPLED, retries)


def test_duplicate_commit(pair: Pair) -> None:
    scenarios.duplicate_commit(pair, SAMPLED, begin_at("middle", 3))


def test_generation_finishes_mid_migration(pair: Pair) -> None:
    scenarios.generation_finishes_mid_migration(pair, GREEDY)


def test_source_lost_target_frees_after_lease(pair: Pair) -> None:
    scenarios.source_lost_target_frees_after_lease(pair, GREEDY, f"lost-{next(_ids)}")


def test_wrong_model_is_refused_by_the_remote_target(pair: Pair) -> None:
    scenarios.wrong_model_is_refused(pair, GREEDY, f"other-{next(_ids)}")


def test_background_source_migrates_while_decoding(source_engine: Any, target_server: Any) -> None:
    """The real mode: the source decodes on its own thread during the rounds (default
    threshold); whatever the timing, the client gets the unmigrated output exactly once."""
    expected = reference(source_engine, SAMPLED)
    client = Client()
    rid = f"bg-{next(_ids)}"
    src = source_engine.start(rid, PROMPT, sampling=SAMPLED, stop=STOP, emit=client.emit)
    src.run(4)
    src.start_background()
    with SocketTransport(target_server.host, target_server.port) as t:
        remote = RemoteTarget(t, rid)
        report = migrate(src, remote)
        if report.outcome is Outcome.COMMITTED:
            client.add(remote.result(timeout_s=60)["tokens"])
        else:
            assert report.outcome is Outcome.FINISHED_ON_SOURCE
            src.wait()
    assert client.output() == expected
