"""vLLM end to end: the same greedy tokens with load_format "fastckpt" (stock and converted
folders) as with vLLM's own "safetensors", for a tiny Llama and a tiny Qwen2; clear errors for an
unknown option and a checkpoint of another model; the plug-in registered in spawned workers.

Runs where vLLM is importable: in the interpreter running pytest, or in the one that
``FASTCKPT_VLLM_PYTHON`` names (the venv of ``tests/vllm_plugin/make_venv.sh``, which keeps vLLM's
pinned versions away from the main suite). Skips elsewhere, saying how to enable it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from vllm_venv import vllm_python

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODELS = ("llama", "qwen2")
# Tensor parallelism on vLLM's CPU build: one worker process per rank, bound to its own cores
# (vllm_e2e.cpu_bind); FASTCKPT_VLLM_E2E_TP=0 leaves it out (it is the slow part of the run).
TP = int(os.environ.get("FASTCKPT_VLLM_E2E_TP", "2"))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = vllm_python("vllm")
    work = tmp_path_factory.mktemp("vllm-e2e")
    args = ["--models", ",".join(MODELS), "--spawn", "--export", "--server"]
    if TP > 1:
        args += ["--tp", str(TP)]
    proc = subprocess.run(
        [python, str(HERE / "vllm_e2e.py"), str(work), *args],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("E2E_ALL ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-6000:]
    results: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    assert "_runner" not in results, results["_runner"]
    return results


def _tokens(results: dict[str, Any], case: str) -> list[list[int]]:
    out = results[case]
    assert "tokens" in out, f"{case}: {out.get('error')}\n{out.get('traceback', '')}"
    return out["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_same_greedy_tokens_as_vllm_safetensors(e2e: dict[str, Any], model: str) -> None:
    reference = _tokens(e2e, f"{model}/safetensors")
    assert len(reference) == 3 and all(len(t) == 12 for t in reference)
    assert _tokens(e2e, f"{model}/fastckpt_stock") == reference
    assert _tokens(e2e, f"{model}/fastckpt_converted") == reference
    assert _tokens(e2e, f"{model}/fastckpt_export") == reference


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_per_rank_export_is_read_exactly_into_the_parameters(
    e2e: dict[str, Any], model: str
) -> None:
    assert "tensor-parallel size 1" in e2e[f"{model}/export_tp1"].get("exported", "")
    (rank,) = e2e[f"{model}/fastckpt_export"]["ranks"]
    assert rank["read_nbytes"] == rank["tensor_nbytes"] == rank["checkpoint_nbytes"] > 0


@pytest.mark.slow
def test_an_export_for_another_dtype_is_refused_saying_how_to_export_again(
    e2e: dict[str, Any],
) -> None:
    error = e2e["error/export_dtype"].get("error", "")
    assert "CheckpointMismatchError" in error, error
    assert "dtype bfloat16 (this engine: float16)" in error
    assert "fastckpt vllm-export" in error and "--dtype float16" in error


@pytest.mark.slow
def test_a_restart_is_served_by_the_nodes_daemon(e2e: dict[str, Any]) -> None:
    reference = _tokens(e2e, "llama/safetensors")
    assert _tokens(e2e, "llama/fastckpt_server_first") == reference
    assert _tokens(e2e, "llama/fastckpt_server_restart") == reference
    (rank,) = e2e["llama/fastckpt_server_restart"]["ranks"]
    assert rank["via"] == "daemon", rank


needs_tp = pytest.mark.skipif(TP < 2, reason="FASTCKPT_VLLM_E2E_TP is below 2")


@pytest.mark.slow
@needs_tp
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_same_tokens_and_each_rank_reads_its_share(
    e2e: dict[str, Any], model: str
) -> None:
    reference = _tokens(e2e, f"{model}/safetensors_tp{TP}")
    for mode in ("stock", "converted", "export"):
        assert _tokens(e2e, f"{model}/fastckpt_{mode}_tp{TP}") == reference, mode
    for mode in ("stock", "converted"):
        ranks = e2e[f"{model}/fastckpt_{mode}_tp{TP}"]["ranks"]
        assert [r["tp_rank"] for r in ranks] == list(range(TP)), ranks
        for r in ranks:
            # only the rank's share and the replicated tensors: well under the checkpoint
            assert r["tensor_nbytes"] <= r["read_nbytes"] < r["checkpoint_nbytes"], (mode, r)
    for r in e2e[f"{model}/fastckpt_export_tp{TP}"]["ranks"]:
        assert r["read_nbytes"] == r["tensor_nbytes"] == r["checkpoint_nbytes"] > 0, r


@pytest.mark.slow
@needs_tp
def test_an_export_for_another_tp_size_is_refused(e2e: dict[str, Any]) -> None:
    error = e2e[f"error/export_tp1_under_tp{TP}"].get("error", "")
    assert "CheckpointMismatchError" in error, error
    assert f"tensor-parallel size 1 (this engine: {TP})" in error
    assert f"--tensor-parallel-size {TP}" in error


@pytest.mark.slow
def test_spawned_workers_register_the_plugin(e2e: dict[str, Any]) -> None:
    assert _tokens(e2e, "llama/fastckpt_converted_spawn") == _tokens(e2e, "llama/safetensors")


@pytest.mark.slow
def test_unknown_option_is_refused(e2e: dict[str, Any]) -> None:
    error = e2e["error/unknown_option"].get("error", "")
    assert "VllmOptionsError" in error and "'engin'" in error and "accepted keys" in error


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(e2e: dict[str, Any]) -> None:
    error = e2e["error/mismatch"].get("error", "")
    assert "CheckpointMismatchError" in error and "does not match model" in error
