"""Serverless serving on Ray Serve with fastckpt: a multiplexed deployment whose replicas load
models through fastckpt's Loader (DRAM and SSD tiers kept after Ray Serve evicts a model), report
what their tiers hold, and are chosen per request by the start-time router.

Run on a local Ray instance (pip install "fastckpt[ray,hf]")::

    python examples/ray_serve/app.py                       # two tiny random models
    python examples/ray_serve/app.py --catalog models.toml # your models (see models.toml)

On a cluster, start the nodes with their own tiers (``FASTCKPT_DRAM_TIER_BYTES``,
``FASTCKPT_SSD_TIER_BYTES``, ``FASTCKPT_SSD_TIER_DIR``) and tier speeds
(``fastckpt calibrate``, ``FASTCKPT_SCHED_PROFILE``) in each node's environment; see
docs/serverless.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile


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


def main() -> None:
    import ray
    from ray import serve

    from fastckpt.integrations.ray_serve import Catalog, build_app

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--catalog", help="a models.toml / .json (default: two tiny models)")
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog.of(args.catalog) if args.catalog else Catalog.of(tiny_models(tmp))
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new local instance
        try:
            serve.start(proxy_location="Disabled")
            app = build_app(
                catalog,
                num_replicas=args.replicas,
                max_models_per_replica=1,
                loader_settings={  # tiers of each replica's Loader
                    "dram_tier_bytes": 256 << 20,
                    "ssd_tier_bytes": 1 << 30,
                    "ssd_tier_dir": os.path.join(tmp, "ssd"),
                },
            )
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
                    else "(resident)",
                    tokens,
                )
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
