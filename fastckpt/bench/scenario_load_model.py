"""Scenarios ``load_model`` and ``lora``: time to a usable transformers model / LoRA adapter.

Generates a LLaMA-like model (``--size`` of bfloat16, random weights) with ``save_pretrained``
and a LoRA adapter for it (``--lora-size``) with peft's ``save_pretrained``, converts both with
``fastckpt.convert`` (reused while the request is unchanged), then measures, each in a fresh
process:

- ``load_model``: ``transformers`` (``AutoModelForCausalLM.from_pretrained(src, dtype="auto",
  device_map=device)``), ``fastckpt`` (``fastckpt.load_model(fck, device=device)``) and
  ``drop-in`` (``fastckpt.transformers.enabled()`` + the same ``from_pretrained`` on ``fck``),
  from a process with torch/transformers imported to a model whose every weight is on the target
  (CUDA synchronised, or every host page touched);
- ``lora``: ``peft`` (``PeftModel.from_pretrained(base, src)``), ``peft-lowmem`` (the same with
  ``low_cpu_mem_usage=True``) and ``fastckpt`` (``fastckpt.load_lora(base, fck)``), the base
  model already loaded and a tiny warm-up adapter attached and removed first (lazy imports are
  not counted);
- both: ``read``, one sequential buffered read of the fastckpt partition files (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastckpt.bench.generate import choose_shape
from fastckpt.bench.harness import Context, Measurement
from fastckpt.rules.units import parse_size

HELP = "time to a usable transformers model / LoRA adapter: stock vs fastckpt"
HELPS = {
    "load_model": "time to a usable transformers model: from_pretrained vs fastckpt.load_model "
    "and the drop-in",
    "lora": "time to attach a LoRA adapter: peft (and its low-memory mode) vs fastckpt.load_lora",
}
MODEL_METHODS = ("transformers", "fastckpt", "drop-in")
LORA_METHODS = ("peft", "peft-lowmem", "fastckpt")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST = "load_model_bench.json"
GENERATOR_VERSION = 1
BASELINES = {"load_model": "model:transformers", "lora": "lora:peft"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lora-size", default="1GB", help="lora: adapter size (default 1GB)")
    group.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="load_model/lora: torch intra-op threads per measurement (0: torch's default; on a "
        "shared machine 1 keeps casts and copies steady)",
    )


def _log(message: str) -> None:
    print(f"[load_model {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Setup:
    """The checkpoints under test (paths) and their sizes."""

    src: str
    fck: str
    lora_src: str
    lora_fck: str
    warmup_src: str
    warmup_fck: str
    model_bytes: int
    lora_bytes: int
    lora_rank: int
    shape: dict[str, int]


def _files(root: str) -> list[str]:
    return sorted(
        os.path.join(root, name)
        for name in os.listdir(root)
        if os.path.isfile(os.path.join(root, name))
    )


def _data_bytes(root: str) -> int:
    import fastckpt

    return int(fastckpt.read_index(root).nbytes)


def _lora_rank(lora_bytes: int, hidden: int, inter: int, layers: int) -> int:
    per_rank = 2 * layers * (11 * hidden + 3 * inter)  # bf16 A and B of the seven projections
    return max(1, round(lora_bytes / per_rank))


def _build_model(dst: str, shape: Any, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, shape.hidden // 64)
    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        num_hidden_layers=shape.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(-0.05, 0.05, generator=gen)
            if name.endswith("norm.weight"):
                param.add_(1.0)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(dst, safe_serialization=True)
    return model


def _save_adapter(model: Any, dst: str, rank: int, targets: Sequence[str], seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = torch.empty(param.shape, dtype=torch.bfloat16).uniform_(
                    -0.02, 0.02, generator=gen
                )
    peft_model.save_pretrained(dst)
    return peft_model.unload()


def prepare(workdir: str, size_bytes: int, lora_bytes: int) -> Setup:
    """Generate (or reuse) the model, the adapters and their fastckpt conversions."""
    import fastckpt

    shape = choose_shape(size_bytes)
    rank = _lora_rank(lora_bytes, shape.hidden, shape.intermediate, shape.layers)
    request = {"version": GENERATOR_VERSION, "shape": asdict(shape), "rank": rank}
    manifest_path = os.path.join(workdir, MANIFEST)
    paths = {
        name: os.path.join(workdir, name)
        for name in ("model-src", "model-fck", "lora-src", "lora-fck", "warmup-src", "warmup-fck")
    }
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            if json.load(fh) == request:
                _log(f"reusing checkpoints in {workdir}")
            else:
                os.remove(manifest_path)
    if not os.path.exists(manifest_path):
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        os.makedirs(workdir, exist_ok=True)
        _log(f"generating a LLaMA-like model {shape} and a rank-{rank} LoRA adapter")
        model = _build_model(paths["model-src"], shape, seed=0)
        model = _save_adapter(model, paths["lora-src"], rank, LORA_TARGETS, seed=1)
        _save_adapter(model, paths["warmup-src"], 1, ("q_proj",), seed=2)
        del model
        for kind in ("model", "lora", "warmup"):
            _log(f"converting {kind}")
            fastckpt.convert(paths[f"{kind}-src"], paths[f"{kind}-fck"], progress=False)
        with open(manifest_path, "w", encoding="utf-8") as fh:
            json.dump(request, fh)
    return Setup(
        src=paths["model-src"],
        fck=paths["model-fck"],
        lora_src=paths["lora-src"],
        lora_fck=paths["lora-fck"],
        warmup_src=paths["warmup-src"],
        warmup_fck=paths["warmup-fck"],
        model_bytes=_data_bytes(paths["model-fck"]),
        lora_bytes=_data_bytes(paths["lora-fck"]),
        lora_rank=rank,
        shape=asdict(shape),
    )


# --------------------------------------------------------------------------------------------
# one measurement (runs in the child process)
# --------------------------------------------------------------------------------------------


def _make_usable(tensors: Sequence[Any], device: str) -> None:
    """CUDA: synchronise. CPU: read one element of every page, so lazy (mmap) loads pay too."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return
    for tensor in tensors:
        if tensor.numel() == 0 or tensor.device.type != "cpu":
            continue
        step = max(1, 4096 // tensor.element_size())
        tensor.detach().reshape(-1)[::step].sum()


def _model_tensors(model: Any) -> list[Any]:
    return [*model.parameters(), *model.buffers()]


def _load_model(method: str, setup: Setup, device: str) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    import fastckpt
    import fastckpt.transformers as drop_in

    # the stored dtype (bfloat16), with the keyword this transformers version knows
    tf5 = int(transformers.__version__.split(".")[0]) >= 5
    options = {"dtype" if tf5 else "torch_dtype": "auto", "device_map": device}
    if method == "transformers":
        return AutoModelForCausalLM.from_pretrained(setup.src, **options)
    if method == "fastckpt":
        return fastckpt.load_model(setup.fck, device=device)
    if method == "drop-in":
        with drop_in.enabled():
            return AutoModelForCausalLM.from_pretrained(setup.fck, **options)
    raise ValueError(f"unknown model method {method!r}")


def _attach(method: str, base: Any, src: str, fck: str) -> Any:
    from peft import PeftModel

    import fastckpt

    if method == "peft":
        return PeftModel.from_pretrained(base, src)
    if method == "peft-lowmem":
        return PeftModel.from_pretrained(base, src, low_cpu_mem_usage=True)
    if method == "fastckpt":
        return fastckpt.load_lora(base, fck)
    raise ValueError(f"unknown LoRA method {method!r}")


def _import_everything() -> None:
    """Import what any method uses, so that no method pays imports inside its timed region.

    (transformers imports a model's module on first use; fastckpt resolves ``load`` lazily.)
    """
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaForCausalLM,
    )

    import fastckpt
    import fastckpt.integrations.peft
    import fastckpt.transformers

    _ = fastckpt.load, fastckpt.read_index, fastckpt.load_model, fastckpt.load_lora


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec`` and return its result."""
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(int(spec["torch_threads"]))
    setup = Setup(**spec["setup"])
    kind, method, device = spec["kind"], spec["method"], spec["device"]
    result: dict[str, Any] = {}
    if kind == "ceiling":
        from fastckpt.bench.ceilings import buffered_read

        files = [f for f in _files(setup.fck) if f.endswith(".fckpt")]
        nbytes, seconds, _ = buffered_read(files)
        result.update(seconds=seconds, nbytes=nbytes)
    elif kind == "model":
        _import_everything()
        t0 = time.perf_counter()
        model = _load_model(method, setup, device)
        _make_usable(_model_tensors(model), device)
        result.update(seconds=time.perf_counter() - t0, nbytes=setup.model_bytes)
    elif kind == "lora":
        _import_everything()
        import fastckpt

        base = fastckpt.load_model(setup.fck, device=device)
        warm = _attach(method, base, setup.warmup_src, setup.warmup_fck)
        base = warm.unload()
        t0 = time.perf_counter()
        peft_model = _attach(method, base, setup.lora_src, setup.lora_fck)
        adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        _make_usable(adapters, device)
        result.update(seconds=time.perf_counter() - t0, nbytes=setup.lora_bytes)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return result


def plan(ctx: Context) -> list[Measurement]:
    lora = ctx.scenario == "lora"
    setup = prepare(ctx.workdir, ctx.size_bytes, parse_size(ctx.option("lora_size", "1GB")))
    files = [*_files(setup.src), *_files(setup.fck), *_files(setup.lora_src)]
    files += _files(setup.lora_fck)
    methods = [("ceiling", "read")]
    methods += (
        [("lora", m) for m in LORA_METHODS] if lora else [("model", m) for m in MODEL_METHODS]
    )
    out = []
    for state in ctx.states:
        for kind, method in methods:
            spec = {
                "kind": kind,
                "method": method,
                "torch_threads": ctx.option("torch_threads", 0),
                "setup": asdict(setup),
            }
            out.append(Measurement(f"{kind}:{method}", spec, state=state, files=files))
    return out


def describe(ctx: Context) -> dict[str, Any]:
    return {"lora_size": ctx.option("lora_size"), "torch_threads": ctx.option("torch_threads")}
