"""``fastckpt bench --scenario serverless`` end to end at its small size: two local Ray clusters
(plain Ray Serve, then fastckpt), every response checked, the report with the simulator's
prediction and the CDF plot written. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_serverless_scenario_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "fastckpt.cli", "bench", "--scenario", "serverless",
        "--serverless-duration", "12", "--workdir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"plain", "fastckpt"}
    assert all(r["ok_runs"] == r["runs"] > 0 and not r["errors"] for r in rows.values())
    extra = rows["fastckpt"]["extra"]
    assert extra["measured"]["failed"] == 0 and extra["predicted"]["requests"] > 0
    report = json.loads((out / "serverless.json").read_text())
    assert set(report["runs"]) == {"plain", "fastckpt"}
    assert sum(report["runs"]["fastckpt"]["loads"].values()) >= 1
    # the co-run calibration of every tier each run loads from, and Ray's model-id lag
    corun = report["calibration"]["corun"]
    assert set(corun) == {"plain", "fastckpt"}
    assert set(corun["fastckpt"]) == {"remote", "ssd", "dram"}
    assert all(f["step_slowdown"] >= 1 for by in corun.values() for f in by.values())
    assert report["setup"]["ids_lag_s"] > 0
    assert (out / "serverless.png").stat().st_size > 0
    assert "simulator" in (out / "serverless.md").read_text()
