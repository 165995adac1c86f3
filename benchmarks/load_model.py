#!/usr/bin/env python3
"""Time to a usable transformers model and to an attached LoRA adapter: fastckpt vs stock.

Generates a LLaMA-like model (``--size``, default 2 GB of bfloat16, random weights) with
``save_pretrained`` and a LoRA adapter for it (``--lora-size``, default 1 GB, bfloat16, random
weights) with peft's ``save_pretrained``, converts both with ``fastckpt.convert``, then measures,
each time in a fresh subprocess, interleaved, ``--repeats`` times per scenario:

model (from a bare process with torch/transformers imported, to a model whose every weight is on
the target: CUDA synchronised, or every host page touched)
    transformers   ``AutoModelForCausalLM.from_pretrained(src, dtype="auto", device_map=device)``
    fastckpt       ``fastckpt.load_model(fck, device=device)``
    drop-in        ``fastckpt.transformers.enabled()`` + the same ``from_pretrained`` on ``fck``
LoRA (the base model already loaded; a tiny warm-up adapter attached and removed first so that
lazy imports are not counted)
    peft           ``PeftModel.from_pretrained(base, src)``
    peft-lowmem    the same with ``low_cpu_mem_usage=True``
    fastckpt       ``fastckpt.load_lora(base, fck)``
ceiling
    read           one sequential buffered read of the fastckpt partition files (same scenario)

Scenarios: ``cold`` (every file of the checkpoints dropped from the page cache before the run;
on a VM the host may still cache them) and ``warm`` (every file read just before). Prints the
machine, a table of medians with the spread and the speed-up over the stock loader, and writes
every run as JSON (``--out``) and optionally a PNG bar chart (``--plot``).

    python benchmarks/load_model.py                              # 2 GB model, 1 GB adapter
    python benchmarks/load_model.py --device cuda:0 --repeats 7
    python benchmarks/load_model.py --size 200MB --lora-size 50MB --repeats 3   # quick look

``--in-process`` runs the measurements in this process (only for smoke tests: imports and
allocator state then leak from one measurement into the next).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastckpt.bench.common import (
    cpu_model,
    drop_from_page_cache,
    median,
    meminfo,
    read_through,
)
from fastckpt.bench.generate import choose_shape
from fastckpt.rules.units import format_bytes, parse_size

MODEL_METHODS = ("transformers", "fastckpt", "drop-in")
LORA_METHODS = ("peft", "peft-lowmem", "fastckpt")
CEILING_METHODS = ("read",)
SCENARIOS = ("cold", "warm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST = "load_model_bench.json"
GENERATOR_VERSION = 1


def _log(message: str) -> None:
    print(f"[load_model {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# generating the checkpoints
# --------------------------------------------------------------------------------------------


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
    model = model.to(torch.bfloat16).to_empty(device="cpu")
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


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
    result: dict[str, Any] = {k: spec[k] for k in ("kind", "method", "scenario", "repeat")}
    if kind == "ceiling":
        files = [f for f in _files(setup.fck) if f.endswith(".fckpt")]
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        nbytes = 0
        t0 = time.perf_counter()
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                while (n := os.readv(fd, [view])) > 0:
                    nbytes += n
            finally:
                os.close(fd)
        result.update(seconds=time.perf_counter() - t0, nbytes=nbytes)
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
    result["peak_rss_bytes"] = _peak_rss_bytes()
    return result


def _child(spec_json: str) -> int:
    try:
        result = measure(json.loads(spec_json))
    except Exception as exc:
        spec = json.loads(spec_json)
        result = {k: spec.get(k) for k in ("kind", "method", "scenario", "repeat")}
        result["error"] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------


def _set_scenario(scenario: str, files: Sequence[str]) -> None:
    if scenario == "cold":
        drop_from_page_cache(files)
    elif scenario == "warm":
        read_through(files)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")


def _run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**_label(spec), "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**_label(spec), "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}


def _label(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("kind", "method", "scenario", "repeat")}


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    plan: list[tuple[str, str]] = [("ceiling", m) for m in CEILING_METHODS if m in args.methods]
    plan += [("model", m) for m in MODEL_METHODS if m in args.methods]
    if not args.skip_lora:
        plan += [("lora", m) for m in LORA_METHODS if f"lora:{m}" in args.methods]
    return plan


def run(
    args: argparse.Namespace, setup: Setup, runner: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    plan = _plan(args)
    all_files = [*_files(setup.src), *_files(setup.fck)]
    all_files += [*_files(setup.lora_src), *_files(setup.lora_fck)]
    results: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for scenario in args.scenarios:
            rotation = repeat % max(1, len(plan))
            for kind, method in plan[rotation:] + plan[:rotation]:
                spec = {
                    "kind": kind,
                    "method": method,
                    "scenario": scenario,
                    "repeat": repeat,
                    "device": args.device,
                    "torch_threads": args.torch_threads,
                    "setup": asdict(setup),
                }
                _set_scenario(scenario, all_files)
                result = runner(spec)
                results.append(result)
                shown = (
                    f"{result['seconds']:.3f} s"
                    if "seconds" in result
                    else f"ERROR {result.get('error')}"
                )
                _log(f"repeat {repeat} {scenario:4} {kind:7} {method:12} {shown}")
    return results


def machine() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": meminfo().get("MemTotal"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median, spread and speed-up over the stock loader per (kind, scenario, method)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["kind"], r["scenario"], r["method"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (kind, scenario, method), runs in groups.items():
        ok = [r for r in runs if "seconds" in r]
        row: dict[str, Any] = {
            "kind": kind,
            "scenario": scenario,
            "method": method,
            "runs": len(runs),
            "errors": [r["error"] for r in runs if "error" in r],
        }
        if ok:
            secs = [r["seconds"] for r in ok]
            nbytes = ok[0]["nbytes"]
            row.update(
                median_s=median(secs),
                min_s=min(secs),
                max_s=max(secs),
                gbps=nbytes / median(secs) / 1e9 if median(secs) > 0 else None,
                peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok),
            )
        rows.append(row)
    baseline = {"model": "transformers", "lora": "peft"}
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["kind"] == row["kind"]
                and r["scenario"] == row["scenario"]
                and r["method"] == baseline.get(row["kind"])
                and "median_s" in r
            ),
            None,
        )
        if base is not None and "median_s" in row and row["median_s"] > 0:
            row["speedup"] = base["median_s"] / row["median_s"]
    return rows


def print_report(info: dict[str, Any], setup: Setup, rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"machine: {info['cpu']} x{info['cpu_count']}, RAM {format_bytes(info['ram_bytes'] or 0)}, "
        f"GPU {info['gpu'] or 'none'}; torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}, Python {info['python']}; torch threads {info['torch_threads']}"
    )
    print(
        f"model: LLaMA-like {setup.shape}, {format_bytes(setup.model_bytes)} bf16; "
        f"LoRA rank {setup.lora_rank}, {format_bytes(setup.lora_bytes)} bf16"
    )
    header = f"{'kind':8} {'scenario':8} {'method':13} {'median s':>9} {'min-max s':>15}"
    print(header + f" {'GB/s':>7} {'x stock':>8} {'peak RSS':>9} runs")
    for row in rows:
        if "median_s" not in row:
            print(
                f"{row['kind']:8} {row['scenario']:8} {row['method']:13} ERROR {row['errors'][0]}"
            )
            continue
        speedup = f"{row['speedup']:.2f}" if "speedup" in row else "-"
        gbps = f"{row['gbps']:.2f}" if row.get("gbps") else "-"
        spread = f"{row['min_s']:.3f}-{row['max_s']:.3f}"
        print(
            f"{row['kind']:8} {row['scenario']:8} {row['method']:13} {row['median_s']:9.3f} "
            f"{spread:>15} {gbps:>7} {speedup:>8} {format_bytes(row['peak_rss_bytes']):>9} "
            f"{row['runs']}"
        )


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "median_s" in r and r["kind"] != "ceiling"]
    labels = [f"{r['kind']}\n{r['scenario']}\n{r['method']}" for r in good]
    fig, ax = plt.subplots(figsize=(max(6, len(good) * 0.9), 4))
    ax.bar(range(len(good)), [r["median_s"] for r in good])
    ax.set_xticks(range(len(good)), labels, fontsize=7)
    ax.set_ylabel("median seconds to a usable model / adapter")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="2GB", help="model size (bfloat16 bytes), e.g. 2GB")
    parser.add_argument("--lora-size", default="1GB", help="adapter size, e.g. 1GB, 200MB")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    everything = [*CEILING_METHODS, *MODEL_METHODS, *(f"lora:{m}" for m in LORA_METHODS)]
    parser.add_argument(
        "--methods", nargs="+", default=everything, choices=everything, help="what to measure"
    )
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads in each measurement (0: torch's default); on a shared or "
        "overloaded machine OpenMP spinning makes casts and copies erratic, 1 keeps them steady",
    )
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (reused)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary workdir")
    parser.add_argument("--out", default=None, help="write every run and the summary as JSON")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per measurement")
    parser.add_argument("--in-process", action="store_true", help="smoke tests only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return _child(args.child)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fastckpt-load-model-")
    try:
        setup = prepare(workdir, parse_size(args.size), parse_size(args.lora_size))
        info = machine()
        info["torch_threads"] = args.torch_threads or "default"

        def in_process(spec: dict[str, Any]) -> dict[str, Any]:
            try:
                return measure(spec)
            except Exception as exc:
                return {**_label(spec), "error": f"{type(exc).__name__}: {exc}"}

        def subprocess_runner(spec: dict[str, Any]) -> dict[str, Any]:
            return _run_child(spec, args.timeout_s)

        results = run(args, setup, in_process if args.in_process else subprocess_runner)
        rows = summarise(results)
        print_report(info, setup, rows)
        report = {
            "machine": info,
            "setup": asdict(setup),
            "device": args.device,
            "torch_threads": args.torch_threads,
            "in_process": args.in_process,
            "summary": rows,
            "runs": results,
        }
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=1)
        if args.plot:
            plot(rows, args.plot)
        print(json.dumps({"summary": rows}))
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
