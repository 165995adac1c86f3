"""The cluster simulator: seeded determinism, bookkeeping invariants, policy sanity."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from fastckpt.sched import SchedError
from fastckpt.sched.sim import POLICIES, Simulation, TraceParams, compare, make_trace, table

SMALL = TraceParams(servers=4, duration_s=300.0, rate_per_server=0.1, seed=1)


def test_trace_is_seeded_and_bursty() -> None:
    models, reqs = make_trace(SMALL)
    assert (models, reqs) == make_trace(SMALL)
    assert make_trace(dataclasses.replace(SMALL, seed=2))[1] != reqs
    assert all(0 <= r.t < SMALL.duration_s for r in reqs)
    assert [r.t for r in reqs] == sorted(r.t for r in reqs)
    gaps = [b.t - a.t for a, b in itertools.pairwise(reqs)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 1.5  # bursty: far more variable than Poisson (cv 1)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_is_accounted_for(policy: str) -> None:
    sim = Simulation(SMALL, policy)
    r = sim.run()
    assert r == dataclasses.replace(Simulation(SMALL, policy).run(), wall_s=r.wall_s)
    assert r.requests == len(sim.trace)
    assert len(sim.latencies) + r.unplaced == r.requests
    assert all(x >= 0 for x in sim.latencies)
    assert r.cold_starts <= r.requests
    assert 0 <= r.gpu_utilisation <= 1
    if policy not in ("sllm", "estimator"):
        assert r.migrations == 0
    for s in sim.servers:  # GPUs are neither lost nor invented
        assert s.free + sum(i.gpus for i in s.insts.values()) == s.gpus
        assert s.avail == s.free + sum(i.gpus for i in s.insts.values() if i.state == "idle")


def test_one_server_policies_agree_and_estimates_beat_random_on_a_cluster() -> None:
    one = compare([1], base=dataclasses.replace(SMALL, duration_s=200.0))
    assert len({(r.mean_startup_s, r.cold_starts) for r in one}) == 1  # nothing to choose
    res = {r.policy: r for r in compare([16], ["random", "estimator"], SMALL)}
    assert res["estimator"].mean_startup_s < res["random"].mean_startup_s
    md = table(one)
    assert md.count("\n") == 1 + len(POLICIES) and "| 1 | estimator |" in md


def test_unknown_policy() -> None:
    with pytest.raises(SchedError, match="unknown policy"):
        Simulation(SMALL, "fastest")
