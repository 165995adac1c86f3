"""The serving deployment with ``engine="vllm"`` end to end; runs in the interpreter that has
vLLM and Ray Serve (the venv of tests/vllm_plugin/make_venv.sh), started by
tests/vllm_ray_serve/test_ray_serve_vllm.py or by hand:

    .vllm-venv/bin/python tests/vllm_ray_serve/ray_serve_vllm.py WORKDIR

Two tiny models with random weights (a Llama and a Qwen2, stock safetensors folders, the ones
tests/vllm_plugin builds); their reference tokens from vLLM alone (``LLM``, vLLM's own
``safetensors`` loader, in a fresh interpreter). Then a one-node local Ray cluster (its own
temporary directory and free ports, on 127.0.0.1) runs the deployment with one replica keeping
one model resident, and asks: llama (a start from the checkpoint), qwen2 (llama evicted: its
engine shut down, its checkpoint kept in the replica's DRAM tier), llama again (a start from
the DRAM tier), then qwen2 through a second application with ``mode="plain"`` (vLLM's default
loader), then llama, qwen2, llama through a third with ``tiers="daemon"`` (a ``fastckpt serve``
daemon the script starts: the evicted llama's next start maps the daemon's copy). Prints
"CLUSTER_TEMP <dir>" once the cluster is up and one line "RAY_VLLM {json}" at the end; the
cluster and the daemon are stopped before it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "vllm_plugin"))

import vllm_e2e  # noqa: E402

MODELS = {"llama": "llama", "qwen": "qwen2"}  # catalog name -> vllm_e2e model kind
PROMPT = vllm_e2e.PROMPTS[0]
TOKENS = vllm_e2e.MAX_TOKENS
#: Engine arguments of every model: the tiny models' context, a small KV cache, no graphs.
VLLM_ARGS = {
    "dtype": "bfloat16",
    "max_model_len": 128,
    "max_num_seqs": 4,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 32 << 20,
}
#: The replica's process: vLLM on one unpinned OpenMP thread (pinned to a busy core of a shared
#: machine, its steps take far longer; see tests/vllm_migrate).
NODE_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def references(paths: dict[str, str]) -> dict[str, list[int]]:
    """Each model's greedy tokens from vLLM alone (its ``safetensors`` loader)."""
    cases: list[dict[str, object]] = [
        dict(name=name, model=path, load_format="safetensors") for name, path in paths.items()
    ]
    results, log = vllm_e2e.run_cases(cases, timeout_s=600)
    out = {}
    for name in paths:
        got = results.get(name, {})
        if "tokens" not in got:
            raise RuntimeError(f"vLLM alone failed on {name}: {got}\n{log[-3000:]}")
        out[name] = got["tokens"][0]  # PROMPTS[0]
    return out


async def ask(handle: Any, model: str) -> dict[str, Any]:
    header: dict[str, Any] = {}
    tokens: list[int] = []
    gen = handle.options(multiplexed_model_id=model, stream=True).generate.remote(PROMPT, TOKENS)
    first_s = None
    start = time.perf_counter()
    async for item in gen:
        if isinstance(item, dict):
            header = item
        else:
            if first_s is None:
                first_s = time.perf_counter() - start
            tokens.append(item)
    return {"model": model, "header": header, "tokens": tokens, "first_token_s": first_s}


def serve_requests(workdir: Path, paths: dict[str, str], out: dict[str, Any]) -> None:
    from ray import serve

    from fastckpt.bench.ray_cluster import LocalCluster, NodeSpec
    from fastckpt.integrations.ray_serve import build_app

    catalog = {"models": {n: {"path": p} for n, p in paths.items()}}
    env = {
        **NODE_ENV,
        "FASTCKPT_DRAM_TIER_BYTES": str(64 << 20),
        "FASTCKPT_SSD_TIER_BYTES": str(256 << 20),
        "FASTCKPT_SSD_TIER_DIR": str(workdir / "ssd"),
    }
    out["steps"] = []
    node = NodeSpec("node0", 1, {"fastckpt_replica": 2}, env)
    with LocalCluster([node], start_timeout_s=240) as cluster:
        print(f"CLUSTER_TEMP {cluster.temp_dir}", flush=True)
        out["cluster_temp"] = cluster.temp_dir
        cluster.connect(log_to_driver=False)
        serve.start(proxy_location="Disabled")
        common: dict[str, Any] = dict(
            num_replicas=1,
            max_models_per_replica=1,
            stats_period_s=0.5,
            ray_actor_options={"num_cpus": 0, "resources": {"fastckpt_replica": 1}},
            engine="vllm",
            vllm_args=VLLM_ARGS,
        )
        fast = serve.run(
            build_app(catalog, name="VllmFast", **common), name="fast", route_prefix="/fast"
        )

        async def scenario() -> None:
            for model in ("llama", "qwen", "llama"):
                step = await ask(fast, model)
                step["engines"] = await fast.engines.remote()
                out["steps"].append(step)
            out["report"] = await fast.report.remote()

        asyncio.run(scenario())
        plain = serve.run(
            build_app(catalog, name="VllmPlain", mode="plain", **common),
            name="plain",
            route_prefix="/plain",
        )

        async def plain_scenario() -> None:
            step = await ask(plain, "qwen")
            step["app"] = "plain"
            step["engines"] = await plain.engines.remote()
            step["report"] = await plain.report.remote()
            out["steps"].append(step)

        asyncio.run(plain_scenario())
        serve.delete("plain")
        serve.delete("fast")
        # The node's fastckpt serve daemon as the tiers (tiers="daemon"): it keeps the
        # checkpoints for every process of the node; the replica's engine maps its copy.
        daemon, sock = vllm_e2e.start_daemon(str(workdir))
        out["daemon_socket"] = sock
        try:
            shared = serve.run(
                build_app(catalog, name="VllmDaemon", tiers="daemon", server=sock, **common),
                name="daemon",
                route_prefix="/daemon",
            )

            async def daemon_scenario() -> None:
                for model in ("llama", "qwen", "llama"):
                    step = await ask(shared, model)
                    step["app"] = "daemon"
                    out["steps"].append(step)
                out["daemon_report"] = await shared.report.remote()

            asyncio.run(daemon_scenario())
            serve.delete("daemon")
        finally:
            vllm_e2e.stop_daemon(daemon)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    workdir = Path(args[0])
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        paths = {
            name: vllm_e2e.build_model(kind, str(workdir / "store"))
            for name, kind in MODELS.items()
        }
        result["reference"] = references(paths)
        serve_requests(workdir, paths, result)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    print("RAY_VLLM " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
