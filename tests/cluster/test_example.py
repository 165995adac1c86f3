"""examples/ray_serve/app.py runs as written: two tiny models on a local Ray instance, each
request answered, the second request of each model served resident or from a tier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_serve" / "app.py"


def test_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("llama-tiny", "qwen-tiny"))]
    assert len(lines) == 4, proc.stdout
    assert all("replica" in ln and "[" in ln for ln in lines)
    assert "started from remote" in lines[0]
