"""Migration scenarios shared by every engine pair's end-to-end tests (the reference engine's in
tests/migrate/test_two_process.py, vLLM's in tests/vllm_migrate): each drives a ``Pair`` and
asserts that the client gets every token once and the output of an unmigrated run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from migrate_helpers import Client, FaultyTarget, MappedSource

from fastckpt.migrate import (
    LeaseExpiredError,
    ModelMismatchError,
    Outcome,
    RemoteTarget,
    SamplingParams,
    SocketTransport,
    migrate,
)


@dataclass
class Run:
    """One migration's pieces, for the assertions."""

    report: Any
    client: Client
    src: Any
    remote: Any
    target_result: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    """A source engine in this process and a target server, as the scenarios drive them.

    Attributes:
        server: the target server (``host``, ``port``).
        start: ``(request_id, sampling, client) -> source`` with ``run(n)`` (decode n tokens).
        run_migration: ``(sampling, begin, rounds, **kw) -> Run``: decode ``begin`` tokens,
            migrate with the source decoding ``paces[rounds]`` tokens between rounds, and let
            whichever side owns the generation finish it (``kw`` go to the wrappers and
            ``migrate``: ``wrap_target``, ``wrap_source``, ``hook``, driver options).
        reference: ``sampling -> tokens`` of an unmigrated run.
        prompt_len, max_new_tokens, lease_s: the prompt length, the generation's budget and
            the server's lease.
    """

    server: Any
    start: Callable[[str, SamplingParams, Client], Any]
    run_migration: Callable[..., Run]
    reference: Callable[[SamplingParams], list[int]]
    prompt_len: int
    max_new_tokens: int
    lease_s: float


def status(server: Any, rid: str) -> dict[str, Any]:
    with SocketTransport(server.host, server.port) as t:
        return RemoteTarget(t, rid).status()


def check_migrated(pair: Pair, run: Run, paces: list[int], begin: int, rounds: int) -> None:
    """A committed migration: its rounds and per-round tokens as paced, the output unmigrated,
    and the source emitted only what it decoded before the switch."""
    report = run.report
    assert report.outcome is Outcome.COMMITTED, report
    assert report.rounds == rounds
    assert report.context_tokens == pair.prompt_len + begin + sum(paces)
    if rounds:
        assert report.tokens_per_round[0] == pair.prompt_len + begin
        assert list(report.tokens_per_round[1:]) == paces[: rounds - 1]
    assert report.final_tokens == (paces[-1] if rounds else report.context_tokens)
    assert len(run.src.emitted) == begin + sum(paces)  # the rest came from the target


def target_fails_mid_round(pair: Pair, sampling: SamplingParams, at: int) -> None:
    faulty: list[FaultyTarget] = []

    def wrap(t: Any) -> FaultyTarget:
        faulty.append(FaultyTarget(t, fail_prefill_at=at))
        return faulty[0]

    run = pair.run_migration(sampling, 0, 3, wrap_target=wrap)
    assert run.report.outcome is Outcome.TARGET_FAILED
    assert "mid-round" in (run.report.error or "")
    assert faulty[0].aborts == [True]
    assert status(pair.server, run.remote.request_id)["status"] == "unknown"  # freed
    assert not run.src.released and run.src.finished
    assert run.client.output() == pair.reference(sampling)


def target_fails_at_commit(pair: Pair, sampling: SamplingParams) -> None:
    run = pair.run_migration(
        sampling, 6, 1, commit_retries=0, wrap_target=lambda t: FaultyTarget(t, commit="before")
    )
    assert run.report.outcome is Outcome.TARGET_FAILED
    assert run.report.downtime_s is not None  # frozen, then rolled back
    assert status(pair.server, run.remote.request_id)["status"] == "unknown"
    assert run.client.output() == pair.reference(sampling)


def commit_reply_lost(pair: Pair, sampling: SamplingParams, retries: int) -> None:
    """The target committed but its reply was lost: a retry (idempotent) or the abort that it
    refuses shows the commit happened, so the source does not decode a second copy."""
    run = pair.run_migration(
        sampling,
        6,
        1,
        commit_retries=retries,
        wrap_target=lambda t: FaultyTarget(t, commit="after"),
    )
    assert run.report.outcome is Outcome.COMMITTED
    assert run.report.commit_attempts == min(retries, 1) + 1
    assert run.src.released
    assert run.client.output() == pair.reference(sampling)


def duplicate_commit(pair: Pair, sampling: SamplingParams, begin: int) -> None:
    run = pair.run_migration(
        sampling, begin, 3, wrap_target=lambda t: FaultyTarget(t, commit="twice")
    )
    assert run.report.outcome is Outcome.COMMITTED and run.report.rounds == 3
    assert run.client.output() == pair.reference(sampling)


def generation_finishes_mid_migration(pair: Pair, sampling: SamplingParams) -> None:
    run = pair.run_migration(
        sampling,
        pair.max_new_tokens - 4,
        1,
        hook=lambda src: lambda info: src.run(),  # the source ends during round 1
    )
    assert run.report.outcome is Outcome.FINISHED_ON_SOURCE, run.report
    assert run.report.rounds == 1
    assert status(pair.server, run.remote.request_id)["status"] == "unknown"  # target freed
    assert run.src.finished and not run.src.released
    assert run.client.output() == pair.reference(sampling)


def source_lost_target_frees_after_lease(pair: Pair, sampling: SamplingParams, rid: str) -> None:
    """The source side vanishes mid-migration (its connection drops, no abort is sent): the
    target keeps the reservation for the lease, then frees it and refuses the request."""
    client = Client()
    src = pair.start(rid, sampling, client)
    src.run(5)
    server = pair.server
    transport = SocketTransport(server.host, server.port)
    covered = RemoteTarget(transport, rid).prefill(src.snapshot())
    assert covered == pair.prompt_len + 5
    transport.close()  # the source is gone
    assert status(server, rid)["status"] == "prefilling"
    deadline = time.monotonic() + 10 * pair.lease_s
    while status(server, rid)["status"] != "expired":
        assert time.monotonic() < deadline, "the target never freed the silent migration"
        time.sleep(pair.lease_s / 4)
    with SocketTransport(server.host, server.port) as t, pytest.raises(LeaseExpiredError):
        RemoteTarget(t, rid).prefill(src.snapshot())
    src.run()  # the source (its engine still alive here) finishes; nothing was lost or doubled
    assert client.output() == pair.reference(sampling)


def wrong_model_is_refused(pair: Pair, sampling: SamplingParams, rid: str) -> None:
    client = Client()
    src = pair.start(rid, sampling, client)
    src.run(3)
    wrong = MappedSource(src, lambda s: s.replace(model_fingerprint="model-sha256:other"))
    with SocketTransport(pair.server.host, pair.server.port) as t:
        with pytest.raises(ModelMismatchError):
            RemoteTarget(t, rid).prefill(wrong.snapshot())
        report = migrate(wrong, RemoteTarget(t, rid))
    assert report.outcome is Outcome.TARGET_FAILED
    assert "ModelMismatchError" in (report.error or "")
    src.run()
    assert client.output() == pair.reference(sampling)
