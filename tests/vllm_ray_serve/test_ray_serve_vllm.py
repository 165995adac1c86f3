"""The serving deployment with ``engine="vllm"`` on a local Ray cluster: every response is vLLM
alone's greedy continuation, a model Ray Serve evicted (one model per replica) is started
again from the replica's DRAM tier, the routing stats count those loads and evictions, an
evicted model's engine is shut down, ``mode="plain"`` (vLLM's default loader) answers the same,
the node's ``fastckpt serve`` daemon as the tiers (``tiers="daemon"``) serves the restart in its
place, and nothing of the cluster is left running afterwards.

Runs where vLLM and Ray Serve are importable: in the interpreter running pytest, or in the one
``FASTCKPT_VLLM_PYTHON`` names (the venv of ``tests/vllm_plugin/make_venv.sh``). Skips
elsewhere, saying how to enable it. About two minutes on 2 busy cores; CI:

    FASTCKPT_VLLM_PYTHON=.vllm-venv/bin/python timeout 900 python3 -m pytest -q tests/vllm_ray_serve
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from vllm_venv import vllm_python

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT_S = 720


def _kill_leftovers(*marks: str) -> list[int]:
    """End any process still using the cluster's temporary directory or the work directory
    (after a driver killed by its timeout: the cluster's nodes, the daemon): its process group,
    or only itself when it is in this test's group; returns their pids."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if any(m.encode() in cmd for m in marks):
                found.append(int(pid))
                group = os.getpgid(int(pid))
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                else:  # never this test's own group
                    os.kill(int(pid), signal.SIGKILL)
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = vllm_python("vllm", "ray.serve")
    work = tmp_path_factory.mktemp("ray-vllm")
    proc = subprocess.Popen(
        [python, str(HERE / "ray_serve_vllm.py"), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    temp = [ln.split(" ", 1)[1] for ln in log.splitlines() if ln.startswith("CLUSTER_TEMP ")]
    left = _kill_leftovers(str(work), *temp)
    lines = [ln for ln in log.splitlines() if ln.startswith("RAY_VLLM ")]
    assert proc.returncode == 0 and lines, log[-6000:]
    result: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback')}"
    result["left_running"] = left
    return result


@pytest.mark.slow
def test_every_response_is_vllm_alones_greedy_continuation(run: dict[str, Any]) -> None:
    ref = run["reference"]
    assert len(ref["llama"]) == 12 and ref["llama"] != ref["qwen"]
    steps = run["steps"]
    asked = ["llama", "qwen", "llama", "qwen", "llama", "qwen", "llama"]
    assert [s["model"] for s in steps] == asked
    for step in steps:
        assert step["tokens"] == ref[step["model"]], step


@pytest.mark.slow
def test_an_evicted_model_starts_again_from_the_dram_tier(run: dict[str, Any]) -> None:
    first, other, again = (s["header"] for s in run["steps"][:3])
    assert first["waited"] and first["tier"] == "remote", first
    assert other["waited"] and other["tier"] == "remote", other
    assert again["waited"] and again["tier"] == "dram", again  # llama was evicted by qwen
    assert first["replica"] == other["replica"] == again["replica"]
    report = run["report"]
    assert report["loads"] == {"dram": 1, "ssd": 0, "remote": 2}, report
    assert report["evictions"] == 2 and report["resident"] == ["llama"], report
    # both checkpoints stay in the replica's tiers: DRAM, and the SSD tier's converted copies
    # of the stock safetensors folders
    assert report["holds"] == {"dram": ["llama", "qwen"], "ssd": ["llama", "qwen"]}, report


@pytest.mark.slow
def test_an_evicted_models_engine_is_shut_down(run: dict[str, Any]) -> None:
    assert [s["engines"]["live"] for s in run["steps"][:3]] == [["llama"], ["qwen"], ["llama"]]
    assert all(s["engines"]["engine"] == "vllm" for s in run["steps"][:3])


@pytest.mark.slow
def test_plain_mode_uses_vllms_own_loader_without_tiers(run: dict[str, Any]) -> None:
    plain = run["steps"][3]
    assert plain["app"] == "plain" and plain["header"]["tier"] == "remote", plain
    assert plain["header"]["replica"] != run["steps"][0]["header"]["replica"]
    assert plain["engines"] == {"engine": "vllm", "mode": "plain", "live": ["qwen"]}
    report = plain["report"]  # no Loader at all: vLLM's default loader read the folder
    assert report["tier_source"] == "none" and report["held_bytes"] == {}, report
    assert report["loads"] == {"dram": 0, "ssd": 0, "remote": 1}, report


@pytest.mark.slow
def test_the_nodes_daemon_keeps_the_checkpoints_for_the_engines(run: dict[str, Any]) -> None:
    steps = [s for s in run["steps"] if s.get("app") == "daemon"]
    assert [s["header"]["tier"] for s in steps] == ["remote", "remote", "dram"], steps
    report = run["daemon_report"]
    # only the engines' loads (through the plug-in, by the replica's daemon client) put the
    # checkpoints in the daemon, which this script started empty
    assert report["tier_source"] == "daemon" and report["holds"] == {"dram": ["llama", "qwen"]}
    assert report["loads"] == {"dram": 1, "ssd": 0, "remote": 2} and report["evictions"] == 2


@pytest.mark.slow
def test_nothing_of_the_cluster_is_left_running(run: dict[str, Any]) -> None:
    assert run["cluster_temp"] and run["left_running"] == [], run["left_running"]
