"""Scenario ``vllm``: weight-loading time inside vLLM, fastckpt beside vLLM's own loaders
(``fastckpt/integrations/vllm/bench.py``), warm and cold: stock and converted folders, a per-rank
export and the ``fastckpt serve`` daemon; start to the first token, peak RSS, bytes read per rank.

vLLM lives in an interpreter of its own (it pins other versions than this one; see
``tests/vllm_plugin/make_venv.sh``), named by ``FASTCKPT_VLLM_PYTHON``. When that is unset, or
vLLM does not import there, the scenario is skipped with the reason in the report (exit status
0). Otherwise ``measure_all`` runs ``python -m fastckpt.integrations.vllm.bench`` with that
interpreter (a model of ``--size``, ``--repeats`` rounds, each round in fresh interpreters of
its own) and turns its timed samples into the harness's results (``results_from``), so the rows
are summarised like every other scenario's. ``--device`` does not apply: the vLLM build decides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from typing import Any

from fastckpt.bench.harness import Context, Measurement, Skipped

HELP = "weight loading inside vLLM, fastckpt beside vLLM's loaders (needs FASTCKPT_VLLM_PYTHON)"
BASELINES = {"vllm": "safetensors"}
ENV = "FASTCKPT_VLLM_PYTHON"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """No options of its own: the interpreter is ``FASTCKPT_VLLM_PYTHON``."""


def vllm_python() -> str:
    """The interpreter named by ``FASTCKPT_VLLM_PYTHON``; ``Skipped`` when it is unset or cannot
    import vLLM and fastckpt's vLLM bench."""
    python = os.environ.get(ENV, "").strip()
    if not python:
        raise Skipped(
            f"{ENV} is not set: name the python of a venv with vLLM "
            "(bash tests/vllm_plugin/make_venv.sh builds one)"
        )
    try:
        proc = subprocess.run(
            [python, "-c", "import vllm, fastckpt.integrations.vllm.bench"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Skipped(f"{ENV}={python} does not run: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise Skipped(f"vLLM does not import in {ENV}={python}: {last}")
    return python


def plan(ctx: Context) -> list[Measurement]:
    ctx.shared["python"] = vllm_python()
    return []


def describe(ctx: Context) -> dict[str, Any]:
    return {k: ctx.shared[k] for k in ("python", "machine", "model") if k in ctx.shared}


def results_from(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The vLLM bench's timed samples as the harness's results: method = loader row name, state =
    cache, seconds in the loader's ``load_weights``; a failed load is an error result."""
    nbytes = int(result["model"]["nbytes"])
    per_round = max(1, len(result["rows"]))
    out = []
    for i, s in enumerate(result["samples"]):
        res: dict[str, Any] = {
            "ok": s.get("weights_s") is not None,
            "method": s["name"],
            "state": s["cache"],
            "round": i // per_round,
            "nbytes": nbytes,
            "extra": {
                k: s.get(k)
                for k in (
                    "vllm_log_s",
                    "resident_bytes",
                    "first_token_s",
                    "peak_rss_bytes",
                    "read_nbytes",
                )
            },
        }
        if res["ok"]:
            res["seconds"] = float(s["weights_s"])
        else:
            res["error"] = str(s.get("error"))
        out.append(res)
    return out


def measure_all(ctx: Context) -> list[dict[str, Any]]:
    from fastckpt.bench.runner import BenchError

    states = [s for s in ctx.states if s in ("warm", "cold")]
    out_json = os.path.join(ctx.workdir, "vllm.json")
    cmd = [
        ctx.shared["python"],
        "-m",
        "fastckpt.integrations.vllm.bench",
        "--size-mb",
        str(max(1, ctx.size_bytes // 1_000_000)),
        "--rounds",
        str(ctx.args.repeats),
        "--workdir",
        os.path.join(ctx.workdir, "models"),
        "--cache",
        states[0] if len(states) == 1 else "both",
        "--json",
        out_json,
    ]
    limit = ctx.args.worker_timeout_s * max(1, ctx.args.repeats)
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=limit,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"the vLLM bench ran past {limit:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(f"the vLLM bench exited with {proc.returncode}: {proc.stdout[-2000:]}")
    with open(out_json, encoding="utf-8") as fh:
        result = json.load(fh)
    ctx.shared.update(machine=result["machine"], model=result["model"])
    return results_from(result)
