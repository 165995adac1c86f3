"""``fastckpt vllm-export MODEL OUT --tensor-parallel-size N``: the command line of
``export.export_model``. It runs vLLM, so it runs in the Python that has vLLM installed (with
vLLM's CPU build in this repository's tests: ``.vllm-venv/bin/fastckpt vllm-export ...``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any

HELP = (
    "run vLLM once and save each tensor-parallel rank's weights as vLLM holds them, before its "
    "post-processing (load with --load-format fastckpt)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder (stock safetensors or fastckpt)")
    p.add_argument("out", help="the export folder to create")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N")
    p.add_argument("--dtype", default="auto", help="as vLLM's --dtype (default auto)")
    p.add_argument("--quantization", "-q", default=None, help="as vLLM's --quantization")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="read the weights from this folder (e.g. a converted copy); MODEL gives the config",
    )
    p.add_argument(
        "--engine-args",
        default="{}",
        metavar="JSON",
        help="more keyword arguments for vllm.LLM, e.g. '{\"trust_remote_code\": true}'",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT")


def run(args: argparse.Namespace) -> int:
    """Run the export; a usage problem is a ValueError (the command line prints it, status 1;
    this module does not import ``fastckpt.cli``, which imports it)."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "fastckpt vllm-export runs vLLM, which this Python cannot import; run it with the "
            "fastckpt of the environment that has vLLM (e.g. .vllm-venv/bin/fastckpt)"
        )
    try:
        engine_args: Any = json.loads(args.engine_args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--engine-args: not JSON ({exc})") from None
    if not isinstance(engine_args, dict):
        raise ValueError("--engine-args: expected a JSON object")
    from fastckpt.integrations.vllm.export import export_model

    target = export_model(
        args.model,
        args.out,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        dtype=args.dtype,
        quantization=args.quantization,
        overwrite=args.overwrite,
        checkpoint=args.checkpoint,
        engine_args=engine_args,
    )
    print(f"exported {args.model} to {args.out}: {target.describe()}")
    return 0
