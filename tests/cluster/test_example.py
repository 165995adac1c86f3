"""examples/ray_serve/app.py runs as written: two tiny models on a local 2-node Ray cluster
started by the script itself (each node with its own tiers), each request answered, the first
one started from the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_serve" / "app.py"


def test_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("llama-tiny", "qwen-tiny"))]
    assert len(lines) == 4, proc.stdout
    assert all("replica" in ln and "[" in ln for ln in lines)
    assert "started from remote" in lines[0]
