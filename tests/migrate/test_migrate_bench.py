"""The measurement script runs (tiny sizes, recompute part only: the migration part uses the
same server and driver as the two-process tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fastckpt.migrate import RecomputeCostModel
from fastckpt.migrate.bench import main, markdown


def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    argv = ["--hidden", "32", "--layers", "1", "--vocab", "64", "--prefill-repeats", "1"]
    argv += ["--prefill-tokens", "8,16,32,64,96,128,160", "--extrapolate-from", "96"]
    argv += ["--skip-migrations", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    (run,) = result["engines"]
    assert run["engine"] == "reference"
    model = RecomputeCostModel.from_dict(run["recompute"]["model"])
    assert model.min_tokens == 8 and model.max_tokens == 160
    assert set(run["recompute"]["extrapolation"]) == {"128", "160"}
    assert "held-out error" in capsys.readouterr().out


def test_bench_refuses_vllm_options_it_cannot_measure(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--engines", "vllm"], "--head-dim 64"),
        (["--engines", "vllm", "--head-dim", "64", "--clock", "thread"], "use process"),
        (["--engines", "sglang"], "reference and/or vllm"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def _run(engine: str, downtime_s: float, gap_s: float | None) -> dict[str, object]:
    return {
        "engine": engine,
        "recompute": {
            "model": {"c0_s": 0.001, "c1_s_per_token": 1e-6, "c2_s_per_token2": 1e-9},
            "held_out_model": {
                "held_out": {"points": 2, "mean_abs_rel_err": 0.1, "max_abs_rel_err": 0.2}
            },
            "points": [[8, 0.001]],
            "extrapolation": {},
            "extrapolation_from_tokens": 1024,
            "samples": {"8": [0.001]},
        },
        "migrations": [
            {
                "context_tokens": 512,
                "runs": [
                    {
                        "outcome": "committed",
                        "rounds": 2,
                        "tokens_per_round": [512, 40],
                        "final_tokens": 3,
                        "downtime_s": downtime_s,
                        "total_s": 0.9,
                        "decode_s_per_token": 0.01,
                        "gap_s": gap_s,
                    }
                ],
            }
        ],
    }


def test_markdown_of_migration_rows_side_by_side() -> None:
    result = {
        "machine": {
            "processor": "cpu",
            "cpus": 2,
            "torch": "x",
            "torch_threads": 1,
            "loadavg": [1.0, 1.0, 1.0],
        },
        "machine_end_loadavg": [2.0, 2.0, 2.0],
        "model_desc": "tiny",
        "repeats": 1,
        "engines": [_run("reference", 0.012, None), _run("vllm", 0.02, 0.05)],
    }
    text = markdown(result)
    assert "| reference | 512 | committed | 10.0 | 2 | 512+40 (+3) | 12.0 (12.0-12.0) |  |" in text
    assert "| vllm | 512 | committed | 10.0 | 2 | 512+40 (+3) | 20.0 (20.0-20.0) | 50.0" in text
    assert "Engine `vllm`." in text
