"""Migrations between two processes: this one (source, client) and a target server process.

The model is a tiny random LlamaForCausalLM in float32 loaded with fastckpt.load_model on both
sides. A migrated generation must give the client exactly the tokens of an unmigrated one, each
once, for every migration point and round count, greedy and sampled, and under failures.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import LEASE_S
from migrate_helpers import (
    PROMPT,
    Client,
    FaultyTarget,
    MappedSource,
    drop_generator_state,
    pace,
)

from fastckpt.migrate import (
    LeaseExpiredError,
    ModelMismatchError,
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
) -> tuple[Any, Client, Any, Any]:
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
    return report, client, src, remote


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rounds", [0, 1, 3])
@pytest.mark.parametrize("point", ["start", "middle", "end"])
def test_migrated_equals_unmigrated(
    source_engine: Any, target_server: Any, sampling: SamplingParams, rounds: int, point: str
) -> None:
    expected = reference(source_engine, sampling)
    begin = begin_at(point, rounds)
    report, client, src, _ = run_migration(source_engine, target_server, sampling, begin, rounds)
    assert report.outcome is Outcome.COMMITTED, report
    assert report.rounds == rounds
    assert report.context_tokens == len(PROMPT) + begin + sum(PACES[rounds])
    if rounds:
        assert report.tokens_per_round[0] == len(PROMPT) + begin
        assert list(report.tokens_per_round[1:]) == PACES[rounds][: rounds - 1]
    assert report.final_tokens == (PACES[rounds][-1] if rounds else report.context_tokens)
    assert client.output() == expected
    assert len(src.emitted) == begin + sum(PACES[rounds])  # the rest came from the target


@pytest.mark.parametrize("point", ["start", "end"])
def test_generator_state_shipping(source_engine: Any, target_server: Any, point: str) -> None:
    expected = reference(source_engine, SAMPLED_GEN)
    report, client, _, _ = run_migration(
        source_engine, target_server, SAMPLED_GEN, begin_at(point, 1), 1
    )
    assert report.outcome is Outcome.COMMITTED
    assert client.output() == expected


def test_negative_control_without_sampling_state(source_engine: Any, target_server: Any) -> None:
    """Dropping the generator state on the way makes the continuation differ: the test above
    passes because the state travels, not by luck."""
    expected = reference(source_engine, SAMPLED_GEN)
    begin = begin_at("middle", 1)
    report, client, _, _ = run_migration(
        source_engine,
        target_server,
        SAMPLED_GEN,
        begin,
        1,
        wrap_source=lambda s: MappedSource(s, drop_generator_state),
    )
    assert report.outcome is Outcome.COMMITTED
    out = client.output()
    switch = report.context_tokens - len(PROMPT)
    assert out[:switch] == expected[:switch]
    assert out[switch:] != expected[switch:]


def test_negative_control_other_seed(source_engine: Any, target_server: Any) -> None:
    """Position-keyed sampling: a target keyed by another seed continues differently."""
    from dataclasses import replace

    expected = reference(source_engine, SAMPLED)
    report, client, _, _ = run_migration(
        source_engine,
        target_server,
        SAMPLED,
        begin_at("middle", 1),
        1,
        wrap_source=lambda s: MappedSource(
            s, lambda st: st.replace(sampling=replace(st.sampling, seed=st.sampling.seed + 1))
        ),
    )
    out = client.output()
    switch = report.context_tokens - len(PROMPT)
    assert out[:switch] == expected[:switch]
    assert out[switch:] != expected[switch:]


# --- failure injection: the client gets every token once, the output equals unmigrated ---------


def _status(server: Any, rid: str) -> dict[str, Any]:
    with SocketTransport(server.host, server.port) as t:
        return RemoteTarget(t, rid).status()


@pytest.mark.parametrize("at", [1, 3])
def test_target_fails_mid_round(source_engine: Any, target_server: Any, at: int) -> None:
    expected = reference(source_engine, SAMPLED)
    faulty: list[FaultyTarget] = []

    def wrap(t: Any) -> FaultyTarget:
        faulty.append(FaultyTarget(t, fail_prefill_at=at))
        return faulty[0]

    report, client, src, remote = run_migration(
        source_engine, target_server, SAMPLED, begin_at("start", 3), 3, wrap_target=wrap
    )
    assert report.outcome is Outcome.TARGET_FAILED
    assert "mid-round" in (report.error or "")
    assert faulty[0].aborts == [True]
    assert _status(target_server, remote.request_id)["status"] == "unknown"  # freed
    assert not src.released and src.finished
    assert client.output() == expected


def test_target_fails_at_commit(source_engine: Any, target_server: Any) -> None:
    expected = reference(source_engine, GREEDY)
    report, client, _, remote = run_migration(
        source_engine,
        target_server,
        GREEDY,
        6,
        1,
        commit_retries=0,
        wrap_target=lambda t: FaultyTarget(t, commit="before"),
    )
    assert report.outcome is Outcome.TARGET_FAILED
    assert report.downtime_s is not None  # frozen, then rolled back
    assert _status(target_server, remote.request_id)["status"] == "unknown"
    assert client.output() == expected


@pytest.mark.parametrize("retries", [0, 2])
def test_commit_reply_lost(source_engine: Any, target_server: Any, retries: int) -> None:
    """The target committed but its reply was lost: a retry (idempotent) or the abort that it
    refuses shows the commit happened, so the source does not decode a second copy."""
    expected = reference(source_engine, SAMPLED)
    report, client, src, _ = run_migration(
        source_engine,
        target_server,
        SAMPLED,
        6,
        1,
        commit_retries=retries,
        wrap_target=lambda t: FaultyTarget(t, commit="after"),
    )
    assert report.outcome is Outcome.COMMITTED
    assert report.commit_attempts == min(retries, 1) + 1
    assert src.released
    assert client.output() == expected


def test_duplicate_commit(source_engine: Any, target_server: Any) -> None:
    expected = reference(source_engine, SAMPLED)
    report, client, _, _ = run_migration(
        source_engine,
        target_server,
        SAMPLED,
        begin_at("middle", 3),
        3,
        wrap_target=lambda t: FaultyTarget(t, commit="twice"),
    )
    assert report.outcome is Outcome.COMMITTED and report.rounds == 3
    assert client.output() == expected


def test_generation_finishes_mid_migration(source_engine: Any, target_server: Any) -> None:
    expected = reference(source_engine, GREEDY)
    report, client, src, remote = run_migration(
        source_engine,
        target_server,
        GREEDY,
        N - 4,
        1,
        hook=lambda src: lambda info: src.run(),  # the source ends during round 1
    )
    assert report.outcome is Outcome.FINISHED_ON_SOURCE, report
    assert report.rounds == 1
    assert _status(target_server, remote.request_id)["status"] == "unknown"  # target freed
    assert src.finished and not src.released
    assert client.output() == expected


def test_source_lost_target_frees_after_lease(source_engine: Any, target_server: Any) -> None:
    """The source side vanishes mid-migration (its connection drops, no abort is sent): the
    target keeps the reservation for the lease, then frees it and refuses the request."""
    expected = reference(source_engine, GREEDY)
    client = Client()
    rid = f"lost-{next(_ids)}"
    src = engine_start(source_engine, rid, client)
    src.run(5)
    transport = SocketTransport(target_server.host, target_server.port)
    covered = RemoteTarget(transport, rid).prefill(src.snapshot())
    assert covered == len(PROMPT) + 5
    transport.close()  # the source is gone
    assert _status(target_server, rid)["status"] == "prefilling"
    deadline = time.monotonic() + 10 * LEASE_S
    while _status(target_server, rid)["status"] != "expired":
        assert time.monotonic() < deadline, "the target never freed the silent migration"
        time.sleep(LEASE_S / 4)
    with (
        SocketTransport(target_server.host, target_server.port) as t,
        pytest.raises(LeaseExpiredError),
    ):
        RemoteTarget(t, rid).prefill(src.snapshot())
    src.run()  # the source (its engine still alive here) finishes; nothing was lost or doubled
    assert client.output() == expected


def engine_start(engine: Any, rid: str, client: Client) -> Any:
    return engine.start(rid, PROMPT, sampling=GREEDY, stop=STOP, emit=client.emit)


def test_wrong_model_is_refused_by_the_remote_target(
    source_engine: Any, target_server: Any
) -> None:
    client = Client()
    src = engine_start(source_engine, f"other-{next(_ids)}", client)
    src.run(3)
    wrong = MappedSource(src, lambda s: s.replace(model_fingerprint="model-sha256:other"))
    with SocketTransport(target_server.host, target_server.port) as t:
        with pytest.raises(ModelMismatchError):
            RemoteTarget(t, src.request_id).prefill(wrong.snapshot())
        report = migrate(wrong, RemoteTarget(t, src.request_id))
    assert report.outcome is Outcome.TARGET_FAILED
    assert "ModelMismatchError" in (report.error or "")
    src.run()
    assert client.output() == reference(source_engine, GREEDY)


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
