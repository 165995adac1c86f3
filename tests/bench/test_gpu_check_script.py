"""benchmarks/gpu_check.sh's dry run: the whole flow on CPU (tiny checkpoint, the device path on a
fake device), so that the one prepared GPU script cannot rot between the sessions that get a GPU.
Slow (it generates a checkpoint and runs every step): CI runs it in the slow step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_dry_run_completes_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "FASTCKPT_GPU_CHECK_DRY": "1",
        "FASTCKPT_GPU_CHECK_SIZE": "24MB",
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["extra.tar.gz", "gpu_check.log", "results.json"]  # at most 8 come back
    data = json.loads((out / "results.json").read_text())
    steps = data["steps"]
    want = ["ceilings", "first_load", "warm_repeat", "dram_tier", "gpu_tier", "iter_tensors"]
    assert data["order"][: len(want)] == want and "cold" in steps
    assert all(s["ok"] for s in steps.values()), {n: s.get("error") for n, s in steps.items()}
    assert steps["warm_repeat"]["stats"]["max_copies_in_flight"] >= 1
    assert steps["iter_tensors"]["bytes_read_direct"] == 0
    assert data["script"]["done"]["status"] == "ok"


@pytest.mark.slow
def test_a_failed_step_makes_the_script_fail(tmp_path: Path) -> None:
    """A crashed benchmark must not read as success (exit 0)."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "FASTCKPT_GPU_CHECK_DRY": "1",
        "FASTCKPT_GPU_CHECK_SIZE": "not-a-size",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode != 0
    data = json.loads((out / "results.json").read_text())
    assert data["script"]["done"]["status"].startswith("failed")
