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
