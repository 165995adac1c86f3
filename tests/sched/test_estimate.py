"""Arithmetic of the estimator, migration plans against brute force, monotonicity, ties."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt.sched import (
    Estimator,
    Instance,
    ModelSpec,
    RecomputeModel,
    SchedError,
    TierQueue,
    TierSpeed,
    load_estimates,
    make_server,
    plan_migration,
)
from fastckpt.sched.estimate import brute_force_plan_cost

GB = 10**9


def _server(name="s0", *, bw=2 * GB, overhead=0.5, queue=None, free=4, running=()):
    return make_server(
        name,
        [TierSpeed("dram", bw, overhead), TierSpeed("ssd", GB / 2, 0.1)],
        gpus=8,
        free_gpus=free,
        holds={"dram": ["m"], "ssd": ["m", "other"]},
        queues={"dram": queue or TierQueue()},
        running=running,
    )


def test_load_time_is_queue_plus_overhead_plus_transfer() -> None:
    srv = _server(queue=TierQueue(loads=2, nbytes=3 * GB))
    est = load_estimates(srv, ModelSpec("m", 4 * GB, gpus=1))
    dram = next(e for e in est if e.tier == "dram")
    # queue: 2 loads x 0.5 s overhead + 3 GB / 2 GB/s = 2.5 s; own: 0.5 s + 4 GB / 2 GB/s = 2.5 s
    assert dram.queue_wait_s == 2.5
    assert dram.overhead_s == 0.5
    assert dram.transfer_s == 2.0
    assert dram.total_s == 5.0
    assert dram.parts == {"queue_wait_s": 2.5, "overhead_s": 0.5, "transfer_s": 2.0}
    ssd = next(e for e in est if e.tier == "ssd")
    assert ssd.total_s == 0.1 + 8.0
    assert [e.tier for e in est] == ["dram", "ssd"]  # fastest first
    assert "queue 2.500 s" in dram.explain() and "2.000 s" in dram.explain()


def test_fastest_tier_accounts_for_queue() -> None:
    # a long queue on the fast tier makes the slower tier the fastest way to load
    srv = _server(queue=TierQueue(loads=1, nbytes=40 * GB))
    best = Estimator().estimate(srv, ModelSpec("m", 4 * GB))
    assert best.load is not None and best.load.tier == "ssd"
    assert [a.tier for a in best.alternatives] == ["dram"]


def test_recompute_cost_and_start_estimate_sum() -> None:
    rc = RecomputeModel(a=0.2, b=0.001, c=1e-6)
    assert rc.cost_s(1000) == pytest.approx(0.2 + 1.0 + 1.0)
    running = (Instance("i1", "x", gpus=4, tokens=1000), Instance("i2", "x", gpus=4, tokens=0))
    srv = _server(free=0, running=running)
    est = Estimator(rc).estimate(srv, ModelSpec("m", 2 * GB, gpus=2))
    assert est.migration is not None and [i.id for i in est.migration.instances] == ["i2"]
    assert est.migration.cost_s == 0.2
    assert est.total_s == pytest.approx(0.2 + 0.5 + 1.0)
    assert est.parts == pytest.approx(
        {"migration_s": 0.2, "queue_wait_s": 0.0, "overhead_s": 0.5, "transfer_s": 1.0}
    )
    assert "migrate 1 instance" in est.explain() and "i2" in est.explain()


def test_recompute_from_dict_shapes() -> None:
    want = RecomputeModel(0.1, 0.002, 3e-7)
    assert RecomputeModel.from_dict({"a": 0.1, "b": 0.002, "c": 3e-7, "units": "s"}) == want
    assert RecomputeModel.from_dict({"coefficients": [0.1, 0.002, 3e-7]}) == want
    assert RecomputeModel.from_dict({"recompute": {"coefficients": [0.1, 0.002, 3e-7]}}) == want
    spelled = {"intercept_s": 0.1, "per_token_s": 0.002, "per_token2_s": 3e-7}
    assert RecomputeModel.from_dict(spelled) == want
    with pytest.raises(SchedError, match="none of the coefficients"):
        RecomputeModel.from_dict({"x": 1})
    with pytest.raises(SchedError, match="twice"):
        RecomputeModel.from_dict({"a": 1, "intercept_s": 1})
    with pytest.raises(SchedError, match=">= 0"):
        RecomputeModel.from_dict({"a": -1})


def test_bad_inputs_raise_specific_errors() -> None:
    with pytest.raises(SchedError, match="bandwidth_bps must be > 0"):
        TierSpeed("dram", 0)
    with pytest.raises(SchedError, match="unknown tiers"):
        make_server("s", [TierSpeed("dram", 1)], gpus=1, holds={"nvme": ["m"]})
    with pytest.raises(SchedError, match="free_gpus"):
        make_server("s", [TierSpeed("dram", 1)], gpus=1, free_gpus=2)
    with pytest.raises(SchedError, match="use 2 GPUs"):
        make_server(
            "s", [TierSpeed("dram", 1)], gpus=2, free_gpus=1, running=[Instance("i", "m", 2)]
        )
    with pytest.raises(SchedError, match="nbytes"):
        ModelSpec("m", -1)
    with pytest.raises(SchedError, match="unique"):
        Estimator().rank([_server("a"), _server("a")], ModelSpec("m", 1))
    with pytest.raises(SchedError, match="no server can start"):
        Estimator().pick([_server("a")], ModelSpec("absent", 1))
    with pytest.raises(SchedError, match="no recompute model"):
        plan_migration([Instance("i", "x", 1)], 1, {"y": RecomputeModel()})


def test_infeasible_reasons() -> None:
    est = Estimator(migrate=False).estimate(_server(free=0), ModelSpec("m", 1, gpus=1))
    assert not est.feasible and "migration off" in est.reason and est.total_s == float("inf")
    est = Estimator().estimate(_server(), ModelSpec("m", 1, gpus=9))
    assert "server has 8" in est.reason
    est = Estimator().estimate(_server(free=0), ModelSpec("m", 1, gpus=1))
    assert "more GPUs than migrating" in est.reason  # nothing runs, yet no GPU is free


_instances = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 5000), st.sampled_from(["x", "y"])),
    min_size=0,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_instances, st.integers(0, 12), st.floats(0, 2), st.floats(0, 1e-3), st.floats(0, 1e-7))
def test_migration_plan_matches_brute_force(specs, need, a, b, c) -> None:
    rc = RecomputeModel(a, b, c)
    running = [Instance(f"i{k}", m, g, t) for k, (g, t, m) in enumerate(specs)]
    plan = plan_migration(running, need, rc)
    ref = brute_force_plan_cost(running, need, rc)
    if ref is None:
        assert plan is None
        return
    assert plan is not None and plan.freed_gpus >= need
    assert plan.cost_s == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # the heuristic is never better than the exact plan, and still frees enough GPUs
    greedy = plan_migration(running, need, rc, exact_cells=0)
    assert greedy is not None and greedy.freed_gpus >= need
    assert greedy.cost_s >= ref - 1e-9 * max(1.0, ref)


@settings(max_examples=100, deadline=None)
@given(_instances, st.integers(1, 10), st.randoms(use_true_random=False))
def test_plan_ignores_input_order(specs, need, rnd) -> None:
    rc = RecomputeModel(0.5, 0.0, 0.0)  # equal costs everywhere: only the tie-break decides
    running = [Instance(f"i{k}", m, g, t) for k, (g, t, m) in enumerate(specs)]
    shuffled = list(running)
    rnd.shuffle(shuffled)
    assert plan_migration(running, need, rc) == plan_migration(shuffled, need, rc)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 10**11),
    st.integers(1, 10**11),
    st.floats(1e6, 1e11),
    st.floats(1e6, 1e11),
    st.integers(0, 5),
    st.integers(0, 10**11),
)
def test_monotone_in_bytes_bandwidth_and_queue(n1, n2, bw1, bw2, loads, qbytes) -> None:
    lo_n, hi_n = sorted((n1, n2))
    lo_bw, hi_bw = sorted((bw1, bw2))
    q_small = TierQueue(loads=loads, nbytes=qbytes // 2 if loads else 0)
    q_big = TierQueue(loads=loads + 1, nbytes=qbytes)

    def t(n, bw, q):
        srv = _server(bw=bw, queue=q)
        return Estimator().estimate(srv, ModelSpec("m", n)).total_s

    assert t(lo_n, lo_bw, q_small) <= t(hi_n, lo_bw, q_small)  # more bytes: never faster
    assert t(lo_n, hi_bw, q_small) <= t(lo_n, lo_bw, q_small)  # more bandwidth: never slower
    assert t(lo_n, lo_bw, q_small) <= t(lo_n, lo_bw, q_big)  # longer queue: never faster


def test_ties_resolve_by_migrations_then_name_in_any_order() -> None:
    rc = RecomputeModel()  # free migrations: a migrating server ties with an idle one
    busy = _server("a", free=0, running=(Instance("i", "x", 8),))
    idle = [_server(n) for n in ("d", "c", "b")]
    servers = [*idle, busy]
    picks = set()
    for perm in itertools.permutations(servers):
        ranked = Estimator(rc).rank(list(perm), ModelSpec("m", GB))
        picks.add(tuple(e.server for e in ranked))
    assert picks == {("b", "c", "d", "a")}


def test_pick_is_the_argmin_on_random_clusters() -> None:
    rng = random.Random(7)
    rc = RecomputeModel(0.3, 2e-4, 0)
    for _ in range(50):
        servers = []
        for k in range(6):
            q = rng.randint(0, 2)
            running = [
                Instance(f"s{k}i{j}", "x", rng.choice([1, 2]), rng.randint(0, 4000))
                for j in range(rng.randint(0, 3))
            ]
            used = sum(i.gpus for i in running)
            servers.append(
                make_server(
                    f"s{k}",
                    [TierSpeed("dram", rng.uniform(1, 20) * GB, rng.uniform(0, 1))],
                    gpus=max(used, 4),
                    free_gpus=max(used, 4) - used,
                    holds={"dram": ["m"] if rng.random() < 0.7 else []},
                    queues={"dram": TierQueue(q, q * rng.randint(0, 2) * GB)},
                    running=running,
                )
            )
        model = ModelSpec("m", rng.randint(1, 30) * GB, gpus=rng.randint(1, 4))
        ranked = Estimator(rc).rank(servers, model)
        totals = [e.total_s for e in ranked]
        assert totals == sorted(totals)
        if ranked[0].feasible:
            assert Estimator(rc).pick(servers, model) == ranked[0]


def test_serial_server_waits_for_every_tier_queue() -> None:
    tiers = [TierSpeed("dram", 2 * GB, 0.5), TierSpeed("ssd", GB, 0.1)]
    kw = {
        "gpus": 1,
        "holds": {"dram": ["a"], "ssd": ["b"]},
        "queues": {"dram": TierQueue(1, 4 * GB), "ssd": TierQueue(2, GB)},
    }
    parallel = make_server("p", tiers, **kw)
    serial = make_server("s", tiers, serial=True, **kw)
    b = ModelSpec("b", GB, gpus=0)
    # per tier: only the ssd queue (2 x 0.1 s + 1 GB / 1 GB/s) is ahead of an ssd load
    assert load_estimates(parallel, b)[0].queue_wait_s == pytest.approx(1.2)
    # one load at a time: the dram queue (0.5 s + 4 GB / 2 GB/s) is ahead too
    est = load_estimates(serial, b)[0]
    assert est.queue_wait_s == pytest.approx(1.2 + 2.5)
    assert (est.queued_loads, est.queued_bytes) == (3, 5 * GB)
    assert est.total_s == pytest.approx(3.7 + 0.1 + 1.0)


def test_nearly_equal_starts_go_where_room_is_free() -> None:
    from fastckpt.sched import prefer_room

    tiers = [TierSpeed("remote", GB, 0.5)]
    full = make_server("a", tiers, gpus=2, free_gpus=0, everywhere=["remote"])
    roomy = make_server("b", tiers, gpus=2, free_gpus=1, everywhere=["remote"])
    quick = make_server("c", [TierSpeed("remote", 2 * GB, 0.1)], gpus=2, free_gpus=0,
                        everywhere=["remote"])  # fmt: skip
    model = ModelSpec("m", GB, gpus=0)
    est = Estimator(migrate=False)
    ranked = est.rank([full, roomy], model)
    assert [e.server for e in ranked] == ["a", "b"]  # equal estimates: by name
    assert [e.server for e in prefer_room(ranked, [full, roomy])] == ["b", "a"]
    # a start clearly faster elsewhere still wins (0.6 s against 1.5 s)
    ranked = est.rank([full, roomy, quick], model)
    assert [e.server for e in prefer_room(ranked, [full, roomy, quick])] == ["c", "a", "b"]
