"""``fastckpt demo``: the main job on an embedded default, end to end.

Generates a small LLaMA-shaped checkpoint as a PyTorch state dict, converts it to the fastckpt
format, loads it back (to CUDA when available, else CPU), checks every tensor bit for bit against
the source, and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any


def demo_state_dict(hidden: int = 512, layers: int = 4, vocab: int = 8192, seed: int = 0) -> Any:
    """A LLaMA-like bf16 state dict with tied embeddings (lm_head shares embed_tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    inter = hidden * 8 // 3 // 64 * 64

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rnd(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    return sd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="where to write the demo files (default: a temp dir)")
    parser.add_argument("--device", default=None, help="cpu | cuda:N (default: cuda:0 if any)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")


def _check_device(device: str) -> None:
    import torch

    from fastckpt.errors import DeviceError
    from fastckpt.loader.plan import resolve_device

    dev = resolve_device(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: CUDA is not available in this process "
                f"(torch {torch.__version__}); use --device cpu"
            )
        if int(dev.split(":", 1)[1]) >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: this process sees {torch.cuda.device_count()} CUDA device(s)"
            )


# where a load's bytes came from (LoadStats.path_taken names fastckpt.loader.policy's sources),
# in words
SOURCE_WORDS = {
    "page-cache-map": "mapped from the page cache (the file was just written: nothing to read)",
    "page-cache-read": "copied from the page cache",
    "map": "mapped from the file (pages read from the disk on first touch)",
    "direct": "O_DIRECT reads from the disk",
    "buffered": "buffered reads",
    "mixed": "buffered and O_DIRECT reads",
    "daemon": "the cache daemon's memory (fastckpt serve)",
    "dram-tier": "the DRAM tier",
    "gpu-tier": "the GPU tier",
    "stream": "ranged GETs from an object store, read as they arrive",
    "stream-map": "ranged GETs from an object store, mapped once they arrived",
    "empty": "nothing (empty tensors)",
}


def _loaded_line(stats: Any) -> str:
    from fastckpt.rules.units import format_bytes, format_rate

    sources = [SOURCE_WORDS.get(s, s) for s in str(stats.path_taken).split("+") if s]
    return (
        f"{stats.tensors} tensors, {format_bytes(stats.nbytes)} to {', '.join(stats.devices)} "
        f"in {stats.seconds:.3f} s ({format_rate(stats.nbytes, stats.seconds)}); "
        f"{'; '.join(sources) or 'no bytes'}"
    )


def _engine_line(info: dict[str, Any]) -> str:
    """What the I/O engine does, as a sentence (engine_info's ``reason``) and liburing's
    version when io_uring is in use."""
    version = info.get("liburing_version")
    uring = "io_uring" in (info.get("direct_reads"), info.get("buffered_reads"))
    return str(info.get("reason", info.get("name"))) + (
        f" (liburing {version})" if uring and version else ""
    )


def run(args: argparse.Namespace) -> int:
    import torch

    import fastckpt

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    _check_device(device)  # before generating anything
    work = args.workdir or tempfile.mkdtemp(prefix="fastckpt-demo-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "pytorch_model.bin")
    dst = os.path.join(work, "demo.fastckpt")
    try:
        sd = demo_state_dict()
        torch.save(sd, src)
        size = os.path.getsize(src)
        print(f"source:    {src} ({len(sd)} tensors, {size / 1e6:.1f} MB, PyTorch state dict)")

        t0 = time.perf_counter()
        fastckpt.convert(src, dst, overwrite=True, progress=False)
        print(f"converted: {dst} in {time.perf_counter() - t0:.2f} s")
        print("           " + str(fastckpt.info(dst)).replace("\n", "\n           "))

        tensors, stats = fastckpt.load(dst, device, stats=True)
        print(f"loaded:    {_loaded_line(stats)}")

        reference = torch.load(src, weights_only=True, mmap=True)
        bad = [
            name
            for name, t in reference.items()
            if not torch.equal(tensors[name].cpu().view(torch.uint8), t.view(torch.uint8))
        ]
        tied = tensors["lm_head.weight"] is tensors["model.embed_tokens.weight"]
        if bad or set(tensors) != set(reference):
            print(f"MISMATCH:  {bad[:5]}")
            return 1
        shared = (
            "lm_head.weight and model.embed_tokens.weight are one tensor, as in the source"
            if tied
            else "lm_head.weight is a copy of model.embed_tokens.weight (the source ties them)"
        )
        print(f"checked:   all {len(reference)} tensors bitwise equal to the source; {shared}")
        print(f"engine:    {_engine_line(fastckpt.engine_info())}")
        return 0
    finally:
        if args.keep:
            print(f"kept:      {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in (src, dst):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)
