"""Migrations between two vLLM engines in two processes: this one (the source, stepped by the
tests, and the client) and a target server (``python -m fastckpt.migrate.serve --engine vllm``).

A migrated generation must give the client exactly the tokens of an unmigrated one, each once,
for every migration point and round count, while another request keeps running on the source;
greedy and position-keyed sampling continue exactly, vLLM's own seeded sampling continues with
the right distribution; failures leave one side decoding and nothing lost or doubled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not importable here: build its venv with "
    "`bash tests/vllm_plugin/make_venv.sh`, then run "
    "`.vllm-venv/bin/python -m pytest -q tests/vllm_migrate`",
)

import migrate_scenarios as scenarios
from migrate_helpers import Client, MappedSource, pace
from migrate_scenarios import Pair, Run
from vllm_migrate_helpers import (
    BLOCK,
    LEASE_S,
    ks_critical,
    ks_uniform,
    probability_transform,
    start_vllm_target,
)

from fastckpt.migrate import (
    Outcome,
    RemoteTarget,
    SamplingParams,
    SocketTransport,
    StopCriteria,
    migrate,
)

PROMPT = tuple((7 * i + 3) % 509 for i in range(70))  # 70 tokens: two full KV blocks of 32
N = 24
STOP = StopCriteria(max_new_tokens=N)
THRESHOLD = 3
# tokens the source decodes after each catch-up round, for 0, 1 and several rounds
PACES = {0: [], 1: [2], 3: [4, 4, 1]}
GREEDY = SamplingParams()
POSITION = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)  # rng="position"
BYSTANDER_PROMPT = tuple(range(100, 140))
BYSTANDER_STOP = StopCriteria(max_new_tokens=48)

_reference: dict[tuple[Any, ...], list[int]] = {}
_ids = iter(range(10**6))


def reference(
    engine: Any,
    sampling: SamplingParams,
    prompt: tuple[int, ...] = PROMPT,
    stop: StopCriteria = STOP,
) -> list[int]:
    key = (sampling, prompt, stop)
    if key not in _reference:
        _reference[key] = engine.generate(prompt, sampling=sampling, stop=stop)
    return _reference[key]


def begin_at(point: str, rounds: int) -> int:
    """Tokens the source has decoded when the migration starts, for the migration point."""
    during = sum(PACES[rounds])
    return {"start": 0, "middle": N // 2 - during // 2, "end": N - 1 - during}[point]


@dataclass
class VllmRun(Run):
    bystander_during: int = 0  # tokens the request that stayed on the source made meanwhile


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
) -> VllmRun:
    """Start a bystander and the request on the source, decode ``begin`` tokens, migrate with
    the source decoding ``PACES[rounds]`` tokens between rounds, then finish everything; the
    bystander, which stayed on the source, must end with its unmigrated tokens."""
    rid = f"req-{next(_ids)}"
    client, bystander_client = Client(), Client()
    bystander = engine.start(
        f"{rid}-bystander", BYSTANDER_PROMPT, stop=BYSTANDER_STOP, emit=bystander_client.emit
    )
    src = engine.start(rid, PROMPT, sampling=sampling, stop=STOP, emit=client.emit)
    src.run(begin)
    before = len(bystander.generated)
    with SocketTransport(server.host, server.port) as transport:
        remote = RemoteTarget(transport, rid)
        target = wrap_target(remote) if wrap_target else remote
        source = wrap_source(src) if wrap_source else src
        kw.setdefault("threshold_tokens", THRESHOLD)
        if rounds == 0:
            kw.setdefault("max_rounds", 0)
        after_round = hook(src) if hook else pace(src, PACES[rounds])
        report = migrate(source, target, after_round=after_round, **kw)
        run = VllmRun(
            report, client, src, remote, bystander_during=len(bystander.generated) - before
        )
        if report.outcome is Outcome.COMMITTED:
            reply, _ = transport.request({"op": "result", "request_id": rid, "timeout_s": 120})
            assert reply["ok"] and reply["finished"], reply
            run.target_result = reply
            client.add(reply["tokens"])
        else:
            src.run()  # the source goes on as if nothing happened
    engine.run(until=lambda: bystander.finished)
    assert bystander_client.output() == reference(
        engine, GREEDY, BYSTANDER_PROMPT, BYSTANDER_STOP
    ), "the request that stayed on the source was disturbed"
    return run


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


def check_prefix_cache(run: VllmRun) -> None:
    """Each prefill ran a vLLM request only when its new tokens completed a KV block, and then
    computed only the new blocks (vLLM found the earlier ones in its prefix cache); the commit
    found every block the rounds computed."""
    covered = computed = 0
    for r in run.target_result["rounds"]:
        covered += r["tokens"]
        whole = covered // BLOCK * BLOCK
        assert r["computed_to"] == max(computed, whole), run.target_result["rounds"]
        if "cached_tokens" in r:  # a vLLM request ran
            assert whole > computed and r["cached_tokens"] >= computed
        else:
            assert whole <= computed
        computed = r["computed_to"]
    assert covered == run.report.context_tokens
    assert run.target_result["commit_cached_tokens"] >= computed


@pytest.mark.parametrize("rounds", [0, 1, 3])
@pytest.mark.parametrize("point", ["start", "middle", "end"])
def test_greedy_migration_equals_unmigrated(
    pair: Pair, source_engine: Any, rounds: int, point: str
) -> None:
    begin = begin_at(point, rounds)
    run = pair.run_migration(GREEDY, begin, rounds)
    scenarios.check_migrated(pair, run, PACES[rounds], begin, rounds)
    assert run.client.output() == reference(source_engine, GREEDY)
    assert isinstance(run, VllmRun) and run.src.released
    if rounds:
        assert run.bystander_during == sum(PACES[rounds])  # it decoded in the same steps
    check_prefix_cache(run)


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("point", ["start", "middle", "end"])
def test_position_sampling_continues_exactly(
    source_engine: Any, target_server: Any, rounds: int, point: str
) -> None:
    expected = reference(source_engine, POSITION)
    assert expected != reference(source_engine, GREEDY)  # it does sample
    run = run_migration(source_engine, target_server, POSITION, begin_at(point, rounds), rounds)
    assert run.report.outcome is Outcome.COMMITTED, run.report
    assert run.client.output() == expected


def test_position_sampling_other_seed_diverges(source_engine: Any, target_server: Any) -> None:
    """Negative control: a target keyed by another seed continues differently, so the test
    above passes because the draws are keyed by (seed, position), not by luck."""
    from dataclasses import replace

    expected = reference(source_engine, POSITION)
    run = run_migration(
        source_engine,
        target_server,
        POSITION,
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


def test_position_sampling_matches_the_reference_engine(
    source_engine: Any, vllm_model: Any
) -> None:
    """vLLM with the PositionSampler draws the same tokens as ``ReferenceEngine`` (transformers)
    on the same weights: the position it uses is the absolute one, the rule is the same."""
    import torch
    import transformers

    from fastckpt.migrate import ReferenceEngine

    model = transformers.LlamaForCausalLM.from_pretrained(vllm_model, dtype=torch.float32)
    ref = ReferenceEngine(model, fingerprint="transformers")
    want = ref.generate(PROMPT, sampling=POSITION, stop=STOP)
    assert reference(source_engine, POSITION) == want


ENGINE_SEEDED = SamplingParams(temperature=1.0, seed=4321, rng="engine")


def test_engine_seeded_sampling_is_exact_from_the_start(
    source_engine: Any, target_server: Any
) -> None:
    """What vLLM's own seeded sampling does reproduce on another engine: a request's draws from
    its first token on (the same seed starts the same stream). Moved before its first token, it
    continues exactly; moved later, see the next test."""
    expected = reference(source_engine, ENGINE_SEEDED)
    assert expected != reference(source_engine, GREEDY)
    run = run_migration(source_engine, target_server, ENGINE_SEEDED, 0, 0)
    assert run.report.outcome is Outcome.COMMITTED and len(run.src.emitted) == 0
    assert run.client.output() == expected


def test_engine_seeded_sampling_continues_with_the_right_distribution(
    source_engine: Any, target_server: Any, vllm_model: Any
) -> None:
    """vLLM's own seeded sampling (rng="engine") cannot continue the source's draws: the state
    says so, and the token drawn on the target right after the switch must follow the model's
    distribution. Over many seeds, the probability transform of those tokens is uniform
    (Kolmogorov-Smirnov at level 0.001); the greedy choice at the same contexts is not."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(vllm_model, dtype=torch.float32)
    k = 6  # tokens made on the source
    stop = StopCriteria(max_new_tokens=k + 1)
    batch, batches = 16, 8
    contexts: list[tuple[int, ...]] = []
    after_switch: list[int] = []
    with SocketTransport(target_server.host, target_server.port) as transport:
        for b in range(batches):
            clients = [Client() for _ in range(batch)]
            seeds = [1000 + b * batch + i for i in range(batch)]
            srcs = [
                source_engine.start(
                    f"engine-rng-{next(_ids)}",
                    PROMPT,
                    sampling=SamplingParams(temperature=1.0, seed=seeds[i], rng="engine"),
                    stop=stop,
                    emit=clients[i].emit,
                )
                for i in range(batch)
            ]
            source_engine.run(until=lambda srcs=srcs: all(len(s.generated) >= k for s in srcs))
            for src, client in zip(srcs, clients, strict=True):
                state = src.snapshot()
                assert state.sampling.rng == "engine" and len(state.generated_ids) == k
                remote = RemoteTarget(transport, src.request_id)
                report = migrate(src, remote, max_rounds=0)
                assert report.outcome is Outcome.COMMITTED, report
                client.add(remote.result(timeout_s=60)["tokens"])
                out = client.output()
                assert out[:k] == list(state.generated_ids)
                contexts.append(state.tokens)
                after_switch.append(out[k])
    with torch.inference_mode():
        probs = [
            torch.softmax(model(torch.tensor([list(c)])).logits[0, -1].double(), -1).tolist()
            for c in contexts
        ]
    n = len(after_switch)
    u = probability_transform(probs, after_switch)
    assert ks_uniform(u) < ks_critical(n), "tokens after the switch do not follow the model"
    greedy = [max(range(len(p)), key=p.__getitem__) for p in probs]
    assert ks_uniform(probability_transform(probs, greedy)) > ks_critical(n)  # the test has power


# --- failure injection: the client gets every token once, the output equals unmigrated ---------


@pytest.mark.parametrize("at", [1, 3])
def test_target_fails_mid_round(pair: Pair, at: int) -> None:
    scenarios.target_fails_mid_round(pair, POSITION, at)


def test_target_fails_at_commit(pair: Pair) -> None:
    scenarios.target_fails_at_commit(pair, GREEDY)


@pytest.mark.parametrize("retries", [0, 2])
def test_commit_reply_lost(pair: Pair, retries: int) -> None:
    scenarios.commit_reply_lost(pair, POSITION, retries)


def test_duplicate_commit(pair: Pair) -> None:
    scenarios.duplicate_commit(pair, GREEDY, begin_at("middle", 3))


def test_generation_finishes_mid_migration(pair: Pair) -> None:
    scenarios.generation_finishes_mid_migration(pair, GREEDY)


def test_source_lost_target_frees_after_lease(pair: Pair) -> None:
    scenarios.source_lost_target_frees_after_lease(pair, GREEDY, f"lost-{next(_ids)}")


def test_wrong_model_is_refused(pair: Pair) -> None:
    scenarios.wrong_model_is_refused(pair, GREEDY, f"other-{next(_ids)}")


@pytest.fixture
def doomed_server(vllm_model: Any) -> Iterator[Any]:
    """A target server of its own, for a test that kills it."""
    server = start_vllm_target(vllm_model)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()
        else:
            assert server.proc.stdin is not None
            server.proc.stdin.close()


def kill(server: Any) -> None:
    server.proc.kill()  # SIGKILL: no goodbye, the connection just breaks
    server.proc.wait(timeout=30)


def test_target_process_killed_between_rounds(source_engine: Any, doomed_server: Any) -> None:
    """The target's process dies after the first round: the next prefill cannot reach it, nor
    can the abort, so the outcome is target_failed; the source was never frozen and finishes
    with the unmigrated tokens while the bystander goes on (``run_migration`` checks it)."""

    def hook(src: Any) -> Any:
        def after(info: Any) -> None:
            if info.round == 1:
                kill(doomed_server)
            src.run(PACES[3][info.round - 1])

        return after

    run = run_migration(source_engine, doomed_server, GREEDY, begin_at("middle", 3), 3, hook=hook)
    assert run.report.outcome is Outcome.TARGET_FAILED, run.report
    assert run.report.rounds == 1 and "cannot connect" in (run.report.error or "")
    assert not run.src.released and run.src.finished
    assert run.client.output() == reference(source_engine, GREEDY)


def test_target_process_killed_before_commit(source_engine: Any, doomed_server: Any) -> None:
    """The target dies while the source is frozen and nothing is left to prefill: the commit and
    the abort both fail, so nobody knows whether the target committed (commit_unknown) and the
    source stays frozen, emitting nothing while its engine steps. The caller, knowing the target
    is gone, unfreezes it: the tokens held back arrive and the output is the unmigrated one."""
    expected = reference(source_engine, POSITION)
    client = Client()
    rid = f"doomed-{next(_ids)}"
    src = source_engine.start(rid, PROMPT, sampling=POSITION, stop=STOP, emit=client.emit)
    src.run(5)
    with SocketTransport(doomed_server.host, doomed_server.port) as transport:
        report = migrate(
            src,
            RemoteTarget(transport, rid),
            threshold_tokens=THRESHOLD,
            after_round=lambda info: kill(doomed_server),  # no token decoded after round 1
        )
    assert report.outcome is Outcome.COMMIT_UNKNOWN, report
    assert report.rounds == 1 and report.final_tokens == 0 and report.commit_attempts == 3
    assert src.frozen and not src.released
    source_engine.run(max_steps=4)  # vLLM decodes on, the frozen request delivers nothing
    assert len(client.tokens) == 5
    src.unfreeze()
    assert len(client.tokens) == 9
    src.run()
    assert client.output() == expected


def test_unsupported_requests_are_refused(source_engine: Any, target_server: Any) -> None:
    """What cannot move exactly is refused before it runs, with the reason."""
    with pytest.raises(ValueError, match="stop strings"):
        source_engine.start("s1", PROMPT, stop=StopCriteria(max_new_tokens=4, stop_strings=("x",)))
    with pytest.raises(ValueError, match="generator"):
        sampled = SamplingParams(temperature=1.0, rng="generator")
        source_engine.start("s2", PROMPT, sampling=sampled, stop=STOP)
    with pytest.raises(ValueError, match="max_model_len"):
        source_engine.start("s3", PROMPT, stop=StopCriteria(max_new_tokens=10_000))


# --- the source engine stepping on its own thread ----------------------------------------------


@pytest.fixture
def background(source_engine: Any) -> Any:
    source_engine.start_background()
    try:
        yield source_engine
    finally:
        source_engine.stop_background()


def _migrate_in_background(engine: Any, server: Any, sampling: SamplingParams) -> Any:
    client = Client()
    rid = f"bg-{next(_ids)}"
    src = engine.start(rid, PROMPT, sampling=sampling, stop=STOP, emit=client.emit)
    while len(src.generated) < 4 and not src.finished:
        time.sleep(0.005)
    with SocketTransport(server.host, server.port) as t:
        remote = RemoteTarget(t, rid)
        report = migrate(src, remote)  # default threshold: rounds follow the decoding speed
        if report.outcome is Outcome.COMMITTED:
            client.add(remote.result(timeout_s=120)["tokens"])
        else:
            assert report.outcome is Outcome.FINISHED_ON_SOURCE, report
            src.wait(120)
    return client.output()


def test_background_source_migrates_while_decoding(background: Any, target_server: Any) -> None:
    """The real mode: the source engine steps on its own thread during the rounds; whatever
    the timing, the client gets the unmigrated output exactly once."""
    for sampling in (GREEDY, POSITION):
        expected = reference(background, sampling)
        assert _migrate_in_background(background, target_server, sampling) == expected


def test_concurrent_migrations_while_the_target_decodes(
    background: Any, target_server: Any
) -> None:
    """A long generation is moved first and keeps decoding on the target while two more move
    there at the same time: every output is exact, and the first one advanced on the target
    while the others were prefilled (vLLM batched them)."""
    long_stop = StopCriteria(max_new_tokens=240)
    expected_long = reference(background, GREEDY, BYSTANDER_PROMPT, long_stop)
    expected = {0: reference(background, GREEDY), 1: reference(background, POSITION)}
    client = Client()
    rid = f"long-{next(_ids)}"
    src = background.start(rid, BYSTANDER_PROMPT, stop=long_stop, emit=client.emit)
    with SocketTransport(target_server.host, target_server.port) as t:
        remote = RemoteTarget(t, rid)
        assert migrate(src, remote).outcome is Outcome.COMMITTED
        first = remote.result(timeout_s=0)
        assert not first["finished"]
        before = len(first["tokens"])
        outputs: dict[int, list[int]] = {}
        threads = [
            threading.Thread(
                target=lambda i=i, s=s: outputs.__setitem__(
                    i, _migrate_in_background(background, target_server, s)
                )
            )
            for i, s in enumerate((GREEDY, POSITION))
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        progressed = len(remote.result(timeout_s=0)["tokens"]) - before
        client.add(remote.result(timeout_s=300)["tokens"])
    assert outputs == expected
    assert progressed > 0
    assert client.output() == expected_long


class StepsSourceFirst:
    """A target whose prefill and commit first let the source engine run ``steps`` steps: the
    source's batch goes on during the downtime, and the frozen request must not emit."""

    def __init__(self, inner: Any, engine: Any, steps: int) -> None:
        self.inner, self.engine, self.steps = inner, engine, steps

    def prefill(self, state: Any) -> int:
        self.engine.run(max_steps=self.steps)
        return int(self.inner.prefill(state))

    def commit(self, state: Any) -> None:
        self.engine.run(max_steps=self.steps)
        self.inner.commit(state)

    def abort(self) -> bool:
        return bool(self.inner.abort())


@pytest.mark.parametrize("rounds", [0, 1])
def test_frozen_source_emits_nothing_while_its_engine_steps(
    source_engine: Any, target_server: Any, rounds: int
) -> None:
    expected = reference(source_engine, POSITION)
    run = run_migration(
        source_engine,
        target_server,
        POSITION,
        5,
        rounds,
        wrap_target=lambda t: StepsSourceFirst(t, source_engine, 3),
    )
    assert run.report.outcome is Outcome.COMMITTED
    assert len(run.src.emitted) == run.report.context_tokens - len(PROMPT)
    assert run.client.output() == expected


def test_unfreeze_delivers_what_was_held_back(source_engine: Any) -> None:
    """A rolled-back migration leaves the stream as if it had never been tried: tokens vLLM
    made while the request was frozen arrive, in order, after unfreeze."""
    expected = reference(source_engine, POSITION)
    client = Client()
    src = source_engine.start(
        f"held-{next(_ids)}", PROMPT, sampling=POSITION, stop=STOP, emit=client.emit
    )
    src.run(4)
    frozen = src.freeze()
    source_engine.run(max_steps=5)
    assert src.snapshot() == frozen and len(client.tokens) == 4
    src.unfreeze()
    assert len(client.tokens) == 9  # the five held back
    src.run()
    assert client.output() == expected
    # released after a freeze: vLLM's request is aborted and nothing more is emitted
    other = source_engine.start(f"gone-{next(_ids)}", PROMPT, stop=STOP)
    other.run(2)
    other.freeze()
    other.release()
    assert other.vllm_id is None
    assert source_engine.run(max_steps=3) == 0  # vLLM has nothing left to do
    assert len(other.emitted) == 2
