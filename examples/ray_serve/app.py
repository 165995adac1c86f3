"""Serverless serving on Ray Serve with fastckpt: a multiplexed deployment whose replicas load
models through fastckpt's Loader (DRAM and SSD tiers kept after Ray Serve evicts a model), report
what their tiers hold, and are chosen per request by the start-time router.

Run on a local Ray instance (``pip install ".[ray,hf]"`` from the root of a clone)::

    python examples/ray_serve/app.py                       # two tiny random models
    python examples/ray_serve/app.py --nodes 2             # on a local 2-node Ray cluster
    python examples/ray_serve/app.py --catalog models.toml # your models (see models.toml)

On a cluster, start the nodes with their own tiers (``FASTCKPT_DRAM_TIER_BYTES``,
``FASTCKPT_SSD_TIER_BYTES``, ``FASTCKPT_SSD_TIER_DIR``) and tier speeds
(``fastckpt calibrate``, ``FASTCKPT_SCHED_PROFILE``) in each node's environment; see
docs/serverless.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from typing import Any


def tiny_models(root: str) -> dict[str, dict[str, str]]:
    """Two small models with random weights, saved as stock safetensors model folders."""
    import torch
    import transformers

    small = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    models = {}
    for name, cls, cfg in (
        ("llama-tiny", transformers.LlamaForCausalLM, transformers.LlamaConfig(**small)),
        ("qwen-tiny", transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small)),
    ):
        torch.manual_seed(len(name))
        path = os.path.join(root, name)
        cls(cfg).save_pretrained(path)
        models[name] = {"path": path}
    return {"models": models}


def local_cluster(nodes: int, root: str) -> Any:
    """``nodes`` Ray nodes on this machine (``ray start --head`` and workers), each with its own
    DRAM- and SSD-tier budgets and SSD directory in its environment, one replica slot each."""
    from fastckpt.bench.ray_cluster import LocalCluster, NodeSpec

    specs = [
        NodeSpec(
            f"node{k}",
            1,
            {"fastckpt_replica": 1},
            {
                "FASTCKPT_DRAM_TIER_BYTES": str(256 << 20),
                "FASTCKPT_SSD_TIER_BYTES": str(1 << 30),
                "FASTCKPT_SSD_TIER_DIR": os.path.join(root, f"node{k}", "ssd"),
            },
        )
        for k in range(nodes)
    ]
    return LocalCluster(specs, start_timeout_s=240)


def main() -> None:
    import ray
    from ray import serve

    from fastckpt.integrations.ray_serve import Catalog, build_app

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", help="a models.toml / .json (default: two tiny models)")
    ap.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="1: a local Ray instance, replicas sharing one Loader setting; N > 1: a local "
        "cluster of N nodes, each with its own tiers and one replica",
    )
    ap.add_argument("--replicas", type=int, default=2, help="replicas (with --nodes 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        catalog = Catalog.of(args.catalog) if args.catalog else Catalog.of(tiny_models(tmp))
        options: dict[str, Any] = {}
        if args.nodes > 1:
            cluster = stack.enter_context(local_cluster(args.nodes, tmp))
            cluster.connect(log_to_driver=False)
            options = {
                "num_replicas": args.nodes,
                "ray_actor_options": {"num_cpus": 0, "resources": {"fastckpt_replica": 1}},
                "max_replicas_per_node": 1,
            }  # each node's tiers come from its environment
        else:
            ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new instance
            stack.callback(ray.shutdown)
            options = {
                "num_replicas": args.replicas,
                "loader_settings": {  # tiers of each replica's Loader
                    "dram_tier_bytes": 256 << 20,
                    "ssd_tier_bytes": 1 << 30,
                    "ssd_tier_dir": os.path.join(tmp, "ssd"),
                },
            }
        serve.start(proxy_location="Disabled")
        stack.callback(serve.shutdown)
        app = build_app(catalog, max_models_per_replica=1, **options)
        handle = serve.run(app, name="fastckpt-serverless")
        for model in [*catalog, *catalog]:
            gen = handle.options(multiplexed_model_id=model, stream=True).generate
            header, tokens = None, []
            for item in gen.remote([1, 2, 3, 4], 6):
                if isinstance(item, dict):
                    header = item
                else:
                    tokens.append(item)
            assert header is not None
            print(
                f"{model}: replica {header['replica']} ({'started from ' + header['tier']}"
                f" in {header['load_s']:.3f} s)"
                if header["waited"]
                else f"{model}: replica {header['replica']} (resident)",
                tokens,
            )


if __name__ == "__main__":
    main()
