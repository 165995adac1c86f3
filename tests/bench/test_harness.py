"""The scenario harness: every registered scenario plans and measures at a tiny size (so none
can rot), the runner measures in fresh processes with settings in the child's environment, and
the report holds a row per method. No timing is asserted."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fastckpt.bench import cli, harness
from fastckpt.bench.runner import run_worker

TINY = {
    "engine": {"size": "1MiB", "no_fio": True},
    "load_model": {"size": "2MB", "lora_size": "200KB", "torch_threads": 1},
    "lora": {"size": "2MB", "lora_size": "200KB", "torch_threads": 1},
    "convert-memory": {"size": "3MB", "tensor_bytes": "200KB", "shards": 2},
    "gpu-sweep": {"size": "2MB", "sweep_repeats": 1},
    "dram-tier": {"size": "2MB"},
    "gpu-tier": {"size": "2MB"},
    "daemon": {"size": "2MB"},
    "iterator": {"size": "2MB"},
    "vllm": {"size": "2MB"},
    "serverless": {"size": "2MB"},
    "gpu-check": {"size": "4MB", "fake_device": True, "check_json": None},
    "remote": {"size": "2MB"},
    "ssd-tier": {"size": "2MB"},
}


def _args(tmp_path: Path, scenario: str, **extra: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--scenario", scenario, "--workdir", str(tmp_path / "work")])
    for key, value in {**TINY[scenario], **extra}.items():
        setattr(args, key, value)
    args.out = str(tmp_path / "out")
    return args


def _context(tmp_path: Path, scenario: str, device: str = "cpu") -> harness.Context:
    from fastckpt.rules.units import parse_size

    args = _args(tmp_path, scenario)
    workdir = tmp_path / "work" / scenario
    workdir.mkdir(parents=True)
    return harness.Context(
        scenario, args, str(workdir), parse_size(args.size), device, ("cold", "warm")
    )


def test_every_scenario_is_registered_completely() -> None:
    assert set(TINY) == set(harness.SCENARIOS)
    for name in harness.SCENARIOS:
        module = harness.module_of(name)
        for attr in ("HELP", "BASELINES", "add_arguments", "plan"):
            assert hasattr(module, attr), (name, attr)
        assert hasattr(module, "measure") or hasattr(module, "measure_all"), name


@pytest.mark.parametrize("scenario", sorted(TINY))
def test_scenario_plans_and_measures_at_a_tiny_size(
    tmp_path: Path, scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each distinct method measured once, in this process (the fresh-process path is below)."""
    monkeypatch.delenv("FASTCKPT_VLLM_PYTHON", raising=False)  # vllm: its skip path (below)
    if scenario == "gpu-check":
        pytest.skip("gpu-check runs its steps end to end: tests/bench/test_gpu_check_script.py")
    import torch

    device = "cuda:0" if scenario == "gpu-tier" and torch.cuda.is_available() else "cpu"
    ctx = _context(tmp_path, scenario, device)
    try:
        plan = harness.module_of(scenario).plan(ctx)
    except harness.Skipped as exc:
        assert scenario in ("gpu-tier", "vllm"), exc
        pytest.skip(f"{scenario}: {exc}")
    if not plan:  # it runs its own processes (measure_all), smoke-run where that is done
        assert hasattr(harness.module_of(scenario), "measure_all"), scenario
        return
    seen = set()
    for m in plan:
        if m.method in seen:
            continue
        seen.add(m.method)
        json.dumps(m.spec)  # specs cross a process boundary
        if m.env:  # settings go to the child's environment, so measure in a child
            continue
        result = harness.module_of(scenario).measure({**m.spec, "device": device})
        assert result["seconds"] >= 0 and result["nbytes"] >= 0, (m.method, result)


def test_cli_runs_a_scenario_in_fresh_processes(tmp_path: Path) -> None:
    args = _args(tmp_path, "engine", repeats=2)
    args.scenarios = "cold,warm"
    assert cli.run(args) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["scenario"] == "engine" and data["machine"]["cpu_count"] >= 1
    methods = {(r["state"], r["method"]) for r in data["rows"]}
    assert ("cold", "auto direct (defaults)") in methods
    assert ("warm", "auto buffered (defaults)") in methods
    assert all(r["ok_runs"] == r["runs"] == 2 for r in data["rows"])
    assert len({r["round"] for r in data["runs"]}) == 2
    assert (tmp_path / "out" / "results.md").read_text().count("| cold |") >= 2
    assert (tmp_path / "out" / "results.png").exists()
    assert not (tmp_path / "work" / "engine").exists()  # removed without --keep


def test_settings_reach_the_child_not_this_process(tmp_path: Path) -> None:
    ctx = _context(tmp_path, "gpu-sweep")
    plan = harness.module_of("gpu-sweep").plan(ctx)
    copying = next(m for m in plan if m.env.get("FASTCKPT_CPU_MAP_CACHED") == "0")
    before = dict(os.environ)
    res = run_worker(
        sys.executable,
        "measure",
        [
            "--module",
            "fastckpt.bench.scenario_gpu_sweep",
            "--spec",
            json.dumps({**copying.spec, "device": "cpu"}),
        ],
        timeout_s=300,
        env=copying.env,
    )
    assert res["ok"], res.get("error")
    assert "mmap" not in res["extra"]["path"]  # the copy path, as the child's setting says
    assert dict(os.environ) == before


def test_summary_compares_rows_with_the_baseline_of_their_kind() -> None:
    runs = [
        {"ok": True, "state": "warm", "method": m, "seconds": s, "nbytes": 10, "round": 0}
        for m, s in (("lora:peft", 2.0), ("lora:fastckpt", 1.0), ("ceiling:read", 0.5))
    ]
    runs.append({"ok": False, "state": "warm", "method": "lora:x", "error": "boom", "round": 0})
    rows = {r["method"]: r for r in harness.summarise(runs, "lora:peft")}
    assert rows["lora:fastckpt"]["speedup"] == 2.0
    assert "speedup" not in rows["ceiling:read"]
    assert rows["lora:x"]["errors"] == ["boom"] and "median_s" not in rows["lora:x"]
    assert "ERROR: boom" in harness.table_markdown(list(rows.values()))
