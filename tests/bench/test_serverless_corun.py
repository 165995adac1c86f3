"""The serverless benchmark's co-run calibration (a start beside token steps in one process) and
its way into the simulator's prediction. No timing is asserted: the slowdowns' bounds and the
samples' shape are."""

from __future__ import annotations

import threading
import time

import pytest

from fastckpt.bench.serverless_prep import coruns_of, measure_corun
from fastckpt.sched.sim_serve import CoRun


def test_measure_corun_times_steps_beside_a_load_in_a_thread() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        seen.append(threading.current_thread().name)
        time.sleep(0.05)

    def step() -> None:
        with lock:  # a step that shares nothing with the load: no slowdown but noise
            time.sleep(0.002)

    got = measure_corun(lambda: seen.append("prepare"), load, step, repeats=2)
    # per repeat: prepare, load alone (here), prepare, load beside the steps (its own thread)
    assert seen == ["prepare", "MainThread", "prepare", "fastckpt-corun-load"] * 2
    assert got["step_slowdown"] >= 1.0 and got["load_slowdown"] >= 1.0
    assert len(got["samples"]) == 2
    assert all(s["steps_during"] >= 1 and s["step_during_s"] > 0 for s in got["samples"])


def test_a_load_shorter_than_a_step_gives_no_step_sample_and_errors_surface() -> None:
    got = measure_corun(lambda: None, lambda: None, lambda: time.sleep(0.01), repeats=1)
    assert got["step_slowdown"] == 1.0 and got["samples"][0]["step_during_s"] is None

    calls = []

    def broken() -> None:  # fine alone, fails in the thread beside the steps
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise OSError("store unreachable")

    with pytest.raises(OSError, match="store unreachable"):
        measure_corun(lambda: None, broken, lambda: None, repeats=1)
    assert calls == ["MainThread", "fastckpt-corun-load"]


def test_calibrated_coruns_become_the_simulators_per_tier() -> None:
    data = {
        "plain": {"remote": {"step_slowdown": 3.5, "load_slowdown": 1.1, "samples": []}},
        "fastckpt": {"dram": {"step_slowdown": 1.2, "load_slowdown": 1.4}},
    }
    assert coruns_of(data) == {
        "plain": {"remote": CoRun(3.5, 1.1)},
        "fastckpt": {"dram": CoRun(1.2, 1.4)},
    }


def _data() -> dict:
    tiers = {t: {"bandwidth_bps": bw, "overhead_s": 0.01} for t, bw in
             (("dram", 1e10), ("ssd", 1e9), ("remote", 1e8), ("plain", 5e8))}  # fmt: skip
    sizes = {"a": 100_000_000, "b": 50_000_000}
    trace = [{"t": 0.0, "model": "a", "tokens": 2}, {"t": 5.0, "model": "b", "tokens": 2}]
    reqs = [
        {"ok": True, "waited": True, "load": "r:1", "tier": "remote", "model": "a", "load_s": 2.0},
        {"ok": True, "waited": True, "load": "r:2", "tier": "remote", "model": "b", "load_s": 1.0},
    ]
    run = {"mean_ttft_s": 1.0, "p50_ttft_s": 1.0, "p99_ttft_s": 2.0, "overhead_s": 0.0,
           "background": 0.0, "loads": {"dram": 0, "ssd": 0, "remote": 2}, "requests": 2,
           "waited": 2}  # fmt: skip
    return {
        "setup": {"nodes": 1, "slots": 1, "dram_bytes": 10**9, "ssd_bytes": 10**9},
        "model_bytes": sizes,
        "machine": {"cpu_count": 2},
        "calibration": {
            "tiers": tiers,
            "compute": {m: {"first_token_s": 0.01, "per_token_s": 0.01} for m in sizes},
            "background": 0.0,
        },
        "trace": trace,
        "runs": {"plain": run, "fastckpt": run},
        "requests": {"plain": reqs, "fastckpt": reqs},
        "ttft": {},
        "predicted": {},
        "difference": {},
    }


def test_the_report_predicts_again_on_the_load_speeds_the_run_observed() -> None:
    from fastckpt.bench.serverless_report import observed_tiers, predict_all, table

    data = _data()
    # two loads, 100 MB in 2 s and 50 MB in 1 s: 50 MB/s, no overhead
    seen = observed_tiers(data, "fastckpt")
    assert seen["remote"]["bandwidth_bps"] == pytest.approx(50e6)
    assert seen["remote"]["overhead_s"] == pytest.approx(0.0, abs=1e-9)
    assert set(observed_tiers(data, "plain")) == {"plain"}
    predict_all(data)
    for run in ("plain", "fastckpt"):
        cal, obs = data["predicted"][run], data["predicted_observed"][run]
        # calibrated: a's first load 1 s (remote) / 0.2 s (plain); observed: 2 s, slower
        assert obs["mean_ttft_s"] > cal["mean_ttft_s"]
        assert set(obs["difference"]) == {"mean_ttft_s", "p50_ttft_s", "p99_ttft_s"}
    assert "observed load speeds" in table(data)


def test_the_breakdown_splits_each_kind_of_request_time() -> None:
    from fastckpt.bench.serverless_report import breakdown

    data = _data()
    times = ((3.0, 2.5, 2.4), (1.5, 1.2, 1.1))
    for r, (ttft, header, wait) in zip(data["requests"]["plain"], times, strict=True):
        r.update(ttft_s=ttft, header_s=header, wait_s=wait)
    data["ttft"] = {"plain": {"simulator": [2.0, 1.0]}}
    rows = [ln for ln in breakdown(data).splitlines() if ln.startswith("| plain")]
    # 2 starts: TTFT (3 + 1.5) / 2, routing 0.1, wait 1.75, load 1.5, first token 0.4, sim 1.5
    assert rows == [
        "| plain | start from remote | 2 | 2.250 | 0.100 | 1.750 | 1.500 | 0.400 | 1.500 |"
    ]
    assert breakdown({"requests": {}}) == ""  # runs recorded before the header times
