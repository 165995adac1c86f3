"""Scenario ``convert-memory``: peak host memory of ``fastckpt.convert``.

Generates a sharded safetensors checkpoint of ``--size`` (tensors of ``--tensor-bytes``, in
``--shards`` files; or one zip-format ``pytorch_model.bin`` with ``--convert-source torch``) and
converts it in a fresh process, beside the same interpreter's peak after the imports alone. The
claim under test: peak memory is about the write buffer plus one tensor (for safetensors
sources, the write buffer alone), whatever the size of the model. Rows: ``imports only`` and
``convert``; ``extra`` has the peak after imports and whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from typing import Any

from fastckpt.bench.harness import Context, Measurement, scratch
from fastckpt.rules.units import MiB, parse_size

HELP = "peak host memory of fastckpt.convert on a sharded safetensors (or torch .bin) source"
BASELINES: dict[str, str] = {}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tensor-bytes", default="128MiB", help="convert-memory: bytes per tensor")
    group.add_argument("--shards", type=int, default=3, help="convert-memory: files (default 3)")
    group.add_argument(
        "--convert-source",
        choices=("safetensors", "torch"),
        default="safetensors",
        help="convert-memory: sharded safetensors (default) or one pytorch_model.bin",
    )


def generate_safetensors(root: str, total: int, tensor_nbytes: int, shards: int) -> int:
    """A sharded safetensors checkpoint of about ``total`` bytes of bf16; its tensor count."""
    count = max(1, total // tensor_nbytes)
    elems = tensor_nbytes // 2
    block = memoryview(os.urandom(4 * MiB))
    weight_map: dict[str, str] = {}
    per_shard = -(-count // shards)
    for s in range(shards):
        names = [
            f"model.layers.{i}.weight"
            for i in range(s * per_shard, min(count, (s + 1) * per_shard))
        ]
        if not names:
            break
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for k, name in enumerate(names):
            header[name] = {
                "dtype": "BF16",
                "shape": [elems],
                "data_offsets": [k * elems * 2, (k + 1) * elems * 2],
            }
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(root, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            left = len(names) * elems * 2
            while left:
                left -= f.write(block[: min(left, len(block))])
    with open(os.path.join(root, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as f:
        f.write("{}")
    return count


def _generate_torch(root: str, total: int, tensor_nbytes: int) -> int:
    import torch

    count = max(1, total // tensor_nbytes)
    block = torch.frombuffer(bytearray(os.urandom(tensor_nbytes // 2 * 2)), dtype=torch.bfloat16)
    torch.save(
        {f"model.layers.{i}.weight": block.clone() for i in range(count)},
        os.path.join(root, "pytorch_model.bin"),
    )
    with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as f:
        f.write("{}")
    return count


def plan(ctx: Context) -> list[Measurement]:
    source = ctx.option("convert_source", "safetensors")
    tensor_bytes = parse_size(ctx.option("tensor_bytes", "128MiB"))
    src = scratch(ctx, "src")
    if source == "torch":
        _generate_torch(src, ctx.size_bytes, tensor_bytes)
    else:
        generate_safetensors(src, ctx.size_bytes, tensor_bytes, ctx.option("shards", 3))
    spec = {"src": src, "dst": os.path.join(ctx.workdir, "dst"), "source": source}
    return [
        Measurement("imports only", {**spec, "convert": False}),
        Measurement("convert", {**spec, "convert": True}),
    ]


def describe(ctx: Context) -> dict[str, Any]:
    from fastckpt.config import get_config

    return {
        "source": ctx.option("convert_source"),
        "tensor_bytes": ctx.option("tensor_bytes"),
        "shards": ctx.option("shards"),
        "write_buffer_bytes": get_config().write_buffer_bytes,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from fastckpt.bench.worker import status_bytes
    from fastckpt.format.convert import convert

    if spec["source"] == "torch":
        import torch  # noqa: F401  (its import is not the converter's memory)
    after_imports = status_bytes("VmHWM")
    nbytes = 0
    t0 = time.perf_counter()
    if spec["convert"]:
        shutil.rmtree(spec["dst"], ignore_errors=True)
        nbytes = convert(spec["src"], spec["dst"], progress=False).nbytes
    seconds = time.perf_counter() - t0
    extra = {
        "peak_rss_after_imports_bytes": after_imports,
        "torch_imported": "torch" in sys.modules,
    }
    return {"seconds": seconds, "nbytes": nbytes, "extra": extra}
