"""Smoke run of the ``dram-tier`` and ``gpu-tier`` benchmark scenarios on a tiny checkpoint, so
they cannot rot (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastckpt.bench import tiers_scenario


def test_dram_tier_scenario_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    tiers_scenario.generate(str(ck), 3 << 20, tensor_bytes=1 << 20)
    out = tmp_path / "r.json"
    assert tiers_scenario.main(["dram-tier", str(ck), "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"cold", "warm", "warm-copy", "dram-tier"}
    assert result["rows"]["dram-tier"]["path_taken"] == "dram-tier"
    assert result["rows"]["warm"]["path_taken"] == "page-cache-map"
    assert result["dram_tier"]["hits"] == 2
    assert "| dram-tier |" in capsys.readouterr().out


def test_gpu_tier_scenario_skips_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("runs for real in the gpu test below")
    result = tiers_scenario.SCENARIOS["gpu-tier"](str(tmp_path), repeats=1)
    assert "skipped" in result


@pytest.mark.gpu
def test_gpu_tier_scenario_smoke(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    tiers_scenario.generate(str(ck), 3 << 20, tensor_bytes=1 << 20)
    result = tiers_scenario.run_gpu_tier(str(ck), repeats=2)
    assert result["rows"]["gpu-tier"]["path_taken"] == "gpu-tier"
    assert result["rows"]["dram-tier"]["path_taken"] == "dram-tier"
