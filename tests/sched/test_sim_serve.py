"""The Ray Serve deployment simulator: its bookkeeping, Ray Serve's multiplexing, and routing."""

from __future__ import annotations

import pytest

from fastckpt.sched import SchedError, TierSpeed
from fastckpt.sched.sim import TraceParams
from fastckpt.sched.sim_serve import (
    ComputeCost,
    CoRun,
    Machine,
    ReplicaSpec,
    ServeRequest,
    percentile,
    predict,
    simulate_serving,
    trace_from,
)

MB = 10**6
TIERS = (TierSpeed("dram", 1000 * MB, 0.01), TierSpeed("ssd", 100 * MB, 0.05),
         TierSpeed("remote", 10 * MB, 0.5))  # fmt: skip
MODELS = {"a": 50 * MB, "b": 50 * MB, "c": 50 * MB}
COST = ComputeCost(0.1, 0.01)


def _rep(name: str, slots: int = 1, dram: int = 60 * MB, ssd: int = 10**9) -> ReplicaSpec:
    return ReplicaSpec(name, TIERS, slots, dram, ssd)


def test_one_replica_loads_serially_through_its_tiers() -> None:
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(0.0, "b", 1), ServeRequest(20.0, "a", 1),
             ServeRequest(30.0, "a", 1)]  # fmt: skip
    res = simulate_serving([_rep("r")], MODELS, trace, "start-time", COST)
    # a from remote (0.5 + 5 s); b waits for it, then remote too; a again: DRAM holds only
    # the last 50 MB model (b), the SSD tier holds a; then a is resident
    assert res.ttft_s[0] == pytest.approx(5.5 + 0.1)
    assert res.ttft_s[1] == pytest.approx(11.0 + 0.1)
    assert res.ttft_s[2] == pytest.approx(0.05 + 0.5 + 0.1)
    assert res.ttft_s[3] == pytest.approx(0.1)
    assert res.waited == (True, True, True, False)
    assert res.loads == {"dram": 0, "ssd": 1, "remote": 2}
    s = res.summary()
    assert s["waited"] == 3 and s["loads"]["remote"] == 2 and s["requests"] == 4


def test_requests_for_a_loading_model_join_its_start() -> None:
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(1.0, "a", 1), ServeRequest(1.0, "a", 1)]
    for policy in ("default", "start-time"):
        res = simulate_serving([_rep("r1"), _rep("r2")], MODELS, trace, policy, COST)
        assert sum(res.loads.values()) == 1, policy
        assert len(set(res.replica)) == 1
        assert res.ttft_s[1] == pytest.approx(5.5 + 0.1 - 1.0)


def test_requests_alternating_between_two_models_reload_them_as_ray_serve_does() -> None:
    # one slot: a loads; b and a wait for the model lock in that order; b's load evicts a, so
    # the second a loads again (Ray Serve's multiplexer checks its cache only when a request
    # gets the lock; it does not join a load that another model's load came between)
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(0.1, "b", 1), ServeRequest(0.2, "a", 1)]
    res = simulate_serving([_rep("r", dram=0, ssd=0)], MODELS, trace, "default", COST)
    assert res.loads == {"dram": 0, "ssd": 0, "remote": 3}
    assert res.ttft_s[2] == pytest.approx(3 * 5.5 + 0.1 - 0.2)
    # two slots: b evicts nothing, so the second a finds a resident when its turn comes
    two = simulate_serving([_rep("r", slots=2, dram=0, ssd=0)], MODELS, trace, "default", COST)
    assert two.loads["remote"] == 2 and two.ttft_s[2] == pytest.approx(11.0 + 0.1 - 0.2)


def test_start_time_routes_to_the_replica_whose_tier_holds_the_model() -> None:
    # warm up: a on r1, b on r2 (each then in its replica's DRAM tier); c evicts both
    warm = [ServeRequest(0.0, "a", 1), ServeRequest(0.0, "b", 1), ServeRequest(20, "c", 1),
            ServeRequest(20, "c", 1)]  # fmt: skip
    probe = [ServeRequest(60.0, "a", 1), ServeRequest(80.0, "b", 1)]
    reps = [_rep("r1", dram=200 * MB), _rep("r2", dram=200 * MB)]
    res = simulate_serving(reps, MODELS, warm + probe, "start-time", COST)
    first = {m: r for m, r in zip([q.model for q in warm], res.replica, strict=False)}
    assert res.replica[4] == first["a"] and res.replica[5] == first["b"]
    assert res.ttft_s[4] == pytest.approx(0.01 + 0.05 + 0.1)


def test_default_router_is_seeded_and_predict_averages_seeds() -> None:
    params = TraceParams(
        servers=2, duration_s=120, rate_per_server=0.2, tokens_min=1, tokens_max=4, seed=3
    )
    trace = trace_from(params, list(MODELS))
    assert {r.model for r in trace} <= set(MODELS) and all(1 <= r.tokens <= 4 for r in trace)
    reps = [_rep("r1", 2), _rep("r2", 2)]
    one = simulate_serving(reps, MODELS, trace, "default", COST, seed=1)
    assert one == simulate_serving(reps, MODELS, trace, "default", COST, seed=1)
    pred = predict(reps, MODELS, trace, "default", COST, seeds=5)
    assert pred["runs"] == 5 and pred["requests"] == len(trace)
    lo, hi = pred["spread"]["mean_ttft_s"]
    assert lo <= pred["mean_ttft_s"] <= hi
    assert predict(reps, MODELS, trace, "start-time", COST)["runs"] == 1


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(SchedError, match="remote"):
        ReplicaSpec("r", (TierSpeed("dram", 1e9),), 1)
    with pytest.raises(SchedError, match="without a size"):
        simulate_serving([_rep("r")], MODELS, [ServeRequest(0, "zz", 1)], "default", COST)
    with pytest.raises(SchedError, match="unknown policy"):
        simulate_serving([_rep("r")], MODELS, [], "random", COST)
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.9) == 0.0


def test_token_steps_queue_on_their_replica() -> None:
    # a resident model: two requests at once on a replica with one step thread; the second's
    # prefill waits for the first's prefill (steps interleave first come, first served)
    warm = [ServeRequest(0.0, "a", 1)]
    both = [ServeRequest(30.0, "a", 3), ServeRequest(30.0, "a", 1)]
    res = simulate_serving([_rep("r")], MODELS, warm + both, "start-time", COST, step_workers=1)
    assert res.ttft_s[1] == pytest.approx(0.1)
    assert res.ttft_s[2] == pytest.approx(0.2)
    free = simulate_serving([_rep("r")], MODELS, warm + both, "start-time", COST)
    assert free.ttft_s[2] == pytest.approx(0.1)  # unlimited threads: no queue


def test_machine_cores_are_shared_by_every_running_job() -> None:
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(0.0, "b", 1)]
    reps = [_rep("r1"), _rep("r2")]
    alone = simulate_serving(reps, MODELS, trace, "start-time", COST)
    assert set(alone.replica) == {"r1", "r2"} and alone.ttft_s[0] == pytest.approx(5.6)
    one_core = Machine(cores=1)
    shared = simulate_serving(reps, MODELS, trace, "start-time", COST, machine=one_core)
    # both loads (5.5 s of work each) run at half speed, then both prefills (0.1 s each)
    assert shared.ttft_s[0] == pytest.approx(11.0 + 0.2)
    # calibrated beside one background thread on one core: the work was half the time
    busy = Machine(cores=1, background=1.0, calibration_background=1.0)
    assert busy.work(2.0) == pytest.approx(1.0) and busy.share(2) == pytest.approx(1 / 3)
    assert Machine().share(5) == 1.0 and Machine().work(2.0) == 2.0


def test_a_replica_shares_its_process_between_a_load_and_token_steps() -> None:
    # a resident, b loading on the same replica: a's prefill shares the replica's core with
    # the load (one interpreter lock) and takes twice as long
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(10.0, "b", 1), ServeRequest(10.0, "a", 1)]
    res = simulate_serving([_rep("r", slots=2)], MODELS, trace, "start-time", COST,
                           machine=Machine(cores=4))  # fmt: skip
    assert res.replica == ("r", "r", "r")
    assert res.ttft_s[2] == pytest.approx(0.2)
    assert res.ttft_s[1] == pytest.approx(5.5 + 0.1 + 0.1)  # the load lost 0.1 s to the step


def test_a_measured_co_run_replaces_equal_sharing_for_loads_from_its_tier() -> None:
    # as above, but the remote tier's load stalls steps 4x and is slowed only 1.25x by them
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(10.0, "b", 1), ServeRequest(10.0, "a", 1)]
    kw = {"machine": Machine(cores=4)}
    co = {"remote": CoRun(step_slowdown=4.0, load_slowdown=1.25)}
    res = simulate_serving([_rep("r", slots=2)], MODELS, trace, "start-time", COST,
                           corun=co, **kw)  # fmt: skip
    assert res.ttft_s[2] == pytest.approx(0.4)  # 0.1 s of work at a quarter of the core
    # the load did 0.4 s x 0.8 = 0.32 s of its 5.5 s while the step ran, then the rest alone
    assert res.ttft_s[1] == pytest.approx(0.4 + (5.5 - 0.32) + 0.1)
    # a co-run given for another tier changes nothing; CoRun(2, 2) is equal sharing
    other = simulate_serving([_rep("r", slots=2)], MODELS, trace, "start-time", COST,
                             corun={"dram": CoRun(4.0, 1.25)}, **kw)  # fmt: skip
    equal = simulate_serving([_rep("r", slots=2)], MODELS, trace, "start-time", COST,
                             corun={"remote": CoRun(2.0, 2.0)}, **kw)  # fmt: skip
    plain = simulate_serving([_rep("r", slots=2)], MODELS, trace, "start-time", COST, **kw)
    assert other.ttft_s == pytest.approx(plain.ttft_s)
    assert equal.ttft_s == pytest.approx(plain.ttft_s)
    with pytest.raises(SchedError, match="co-run"):
        CoRun(0.5, 1.0)


def test_the_default_router_sees_model_ids_late_and_starts_the_model_again() -> None:
    # two replicas; a is requested at 0, again at 0.05 s: with no lag the second request sees
    # a on the replica loading it and joins the load; 0.1 s late it sees nothing there, goes to
    # a replica with the fewest models (the idle one: pow2 on in-flight requests) and loads a
    # there too
    trace = [ServeRequest(0.0, "a", 1), ServeRequest(0.05, "a", 1)]
    reps = [_rep("r1"), _rep("r2")]
    now = simulate_serving(reps, MODELS, trace, "default", COST)
    late = simulate_serving(reps, MODELS, trace, "default", COST, ids_lag_s=0.1)
    assert sum(now.loads.values()) == 1 and len(set(now.replica)) == 1
    assert sum(late.loads.values()) == 2 and set(late.replica) == {"r1", "r2"}
    # the start-time router keeps its own view: no lag there
    st = simulate_serving(reps, MODELS, trace, "start-time", COST, ids_lag_s=0.1)
    assert sum(st.loads.values()) == 1
    with pytest.raises(SchedError, match="ids_lag_s"):
        simulate_serving(reps, MODELS, trace, "default", COST, ids_lag_s=-1.0)
