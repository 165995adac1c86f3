"""The harness scenarios that need more than plan + measure: ``daemon`` (a daemon the harness
holds around the measurements, each measurement a fresh process), ``vllm`` (skipped with a
reason when no vLLM interpreter is named; its bench's samples become the harness's rows). No
timing is asserted; the vLLM bench itself is not run here (tests/vllm_plugin does that)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fastckpt.bench import cli, harness, scenario_vllm
from fastckpt.integrations.vllm import bench as vllm_bench


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(
        [*argv, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    )


def test_daemon_scenario_loads_from_a_daemon_it_starts_and_stops(tmp_path: Path) -> None:
    args = _args(tmp_path, "--scenario", "daemon", "--size", "2MB", "--repeats", "1")
    args.scenarios = "warm"
    assert cli.run(args) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    taken = {r["method"]: r["extra"]["taken"] for r in data["rows"]}
    assert set(taken) == {"fastckpt.load", "daemon"}
    assert taken["daemon"] == "daemon"
    assert not taken["fastckpt.load"].startswith("server")
    daemon_row = next(r for r in data["rows"] if r["method"] == "daemon")
    assert "speedup" in daemon_row and data["setup"]["daemon_fill_s"] is not None
    assert not os.path.exists(os.path.dirname(data["setup"]["socket"]))  # daemon stopped


def test_vllm_scenario_without_an_interpreter_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FASTCKPT_VLLM_PYTHON", raising=False)
    args = _args(tmp_path, "--scenario", "vllm")
    assert cli.run(args) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["rows"] == [] and data["runs"] == []
    assert data["notes"][0].startswith("skipped: FASTCKPT_VLLM_PYTHON is not set")
    assert "skipped: FASTCKPT_VLLM_PYTHON" in (tmp_path / "out" / "results.md").read_text()


def test_vllm_scenario_with_an_interpreter_lacking_vllm_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable in this interpreter")
    monkeypatch.setenv("FASTCKPT_VLLM_PYTHON", sys.executable)
    with pytest.raises(harness.Skipped, match="vLLM does not import"):
        scenario_vllm.vllm_python()
    monkeypatch.setenv("FASTCKPT_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(harness.Skipped, match="does not run"):
        scenario_vllm.vllm_python()


def _sample(name: str, cache: str, seconds: float | None) -> dict[str, Any]:
    error = None if seconds is not None else "ValueError: no such load format"
    return {
        "name": name,
        "cache": cache,
        "resident_bytes": 0,
        "error": error,
        "weights_s": seconds,
        "vllm_log_s": seconds,
    }


def test_vllm_bench_samples_become_the_same_rows_in_the_harness() -> None:
    loaders = [("safetensors", "stock"), ("fastckpt", "stock"), ("runai_streamer", "stock")]
    caches = ("warm", "cold")
    samples = []
    for base, ours in ((2.0, 1.0), (3.0, 0.5), (2.5, 0.8)):
        for cache in caches:
            samples.append(_sample("safetensors", cache, base * (1 if cache == "warm" else 2)))
            samples.append(_sample("fastckpt", cache, ours * (1 if cache == "warm" else 2)))
            samples.append(_sample("runai_streamer", cache, None))
    nbytes = 1_000_000
    canned = {
        "machine": {"vllm": "0.0-test", "cpus": 2},
        "model": {"nbytes": nbytes, "stock": "s", "converted": "c"},
        "rows": vllm_bench.summarise(samples, loaders, caches, nbytes),
        "samples": samples,
    }
    results = scenario_vllm.results_from(canned)
    assert len(results) == len(samples) and {r["round"] for r in results} == {0, 1, 2}
    rows = {(r["state"], r["method"]): r for r in harness.summarise(results, "safetensors")}
    for theirs in canned["rows"]:
        mine = rows[(theirs["cache"], theirs["loader"])]
        if "error" in theirs:
            assert mine["errors"] == [theirs["error"]] and "median_s" not in mine
            continue
        assert (mine["median_s"], mine["min_s"], mine["max_s"]) == (
            theirs["median_s"],
            theirs["min_s"],
            theirs["max_s"],
        )
        assert mine["ok_runs"] == theirs["n"]
    assert rows[("warm", "fastckpt")]["speedup"] == pytest.approx(2.5 / 0.8)
