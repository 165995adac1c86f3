"""The engine benchmark runs end to end at a tiny size (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "engine.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("fastckpt_bench_engine", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_parse_size() -> None:
    bench = load_bench()
    assert bench.parse_size("2G") == 2 << 30
    assert bench.parse_size("512MiB") == 512 << 20
    assert bench.parse_size("4096") == 4096
    assert bench.fmt_size(4 << 20) == "4M"


@pytest.mark.parametrize("fio", [False, True])
def test_smoke(tmp_path: Path, fio: bool, capsys: pytest.CaptureFixture[str]) -> None:
    if fio and shutil.which("fio") is None:
        pytest.skip("fio not installed")
    bench = load_bench()
    out = tmp_path / "r.json"
    argv = [
        "--size",
        "2M",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
        "--queue-depths",
        "4",
        "--chunks",
        "1M",
        "--threads",
        "2",
        "--json",
        str(out),
    ]
    results = bench.main([*argv, *([] if fio else ["--no-fio"])])
    printed = capsys.readouterr().out
    assert "cold (page cache dropped)" in printed and "warm (page-cached)" in printed
    assert json.loads(out.read_text())["file"]["nbytes"] == 2 << 20
    for scenario in ("cold", "warm"):
        rows = results[scenario]
        assert rows and all(r["median_gbps"] > 0 for r in rows)
        assert any(r["fio"] for r in rows) == fio
    assert not list(tmp_path.glob("fastckpt-bench-*"))  # the test file was removed
