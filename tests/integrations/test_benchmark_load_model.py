"""Smoke runs of benchmarks/load_model.py at a tiny size, so that it cannot rot (no timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_model.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_in_process(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    png = tmp_path / "result.png"
    argv = ["--size", "2MB", "--lora-size", "200KB", "--repeats", "1", "--scenarios", "warm"]
    argv += ["--workdir", str(tmp_path / "work"), "--out", str(out), "--plot", str(png)]
    assert bench.main([*argv, "--in-process"]) == 0
    report = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    setup = report["setup"]
    assert setup["model_bytes"] > 1_000_000 and setup["lora_bytes"] > 0 and setup["lora_rank"] >= 1
    rows = {(r["kind"], r["method"]): r for r in report["summary"]}
    expected = {("ceiling", "read")}
    expected |= {("model", m) for m in bench.MODEL_METHODS}
    expected |= {("lora", m) for m in bench.LORA_METHODS}
    assert rows.keys() == expected
    for row in rows.values():
        assert row["errors"] == [] and row["median_s"] > 0 and row["peak_rss_bytes"] > 0
    assert rows[("model", "transformers")]["speedup"] == 1.0
    assert "speedup" in rows[("model", "fastckpt")] and "speedup" in rows[("lora", "fastckpt")]
    printed = capsys.readouterr().out
    assert "machine:" in printed and "drop-in" in printed
    # the generated checkpoints are reused by a second run with the same request
    again = bench.prepare(str(tmp_path / "work"), 2_000_000, 200_000)
    assert asdict(again) == setup


def test_child_process_round_trip(bench: ModuleType, tmp_path: Path) -> None:
    """The fresh-subprocess path: one ceiling measurement in a child."""
    import fastckpt

    from_dir = tmp_path / "fck"
    (tmp_path / "src").mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1024, 64)}, str(tmp_path / "src" / "model.safetensors"))
    fastckpt.convert(tmp_path / "src", from_dir)
    setup = bench.Setup(
        src=str(tmp_path / "src"),
        fck=str(from_dir),
        lora_src="",
        lora_fck="",
        warmup_src="",
        warmup_fck="",
        model_bytes=1024 * 64 * 4,
        lora_bytes=0,
        lora_rank=1,
        shape={},
    )
    spec = {"kind": "ceiling", "method": "read", "scenario": "warm", "repeat": 0}
    result = bench._run_child({**spec, "device": "cpu", "setup": asdict(setup)}, 120)
    assert "error" not in result, result
    assert result["nbytes"] >= 1024 * 64 * 4 and result["seconds"] >= 0
    bad = bench._run_child(
        {**spec, "kind": "nonsense", "device": "cpu", "setup": asdict(setup)}, 120
    )
    assert "unknown kind" in bad["error"]
