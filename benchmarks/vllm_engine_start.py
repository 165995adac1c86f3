"""How long the serving deployment's ``engine="vllm"`` takes to start one engine, through
fastckpt (cold, and from the DRAM tier) and through vLLM's default loader (cold and with the
files in the page cache): ``ray_serve.vllm_runner.load_vllm``, the replica's own code path,
without Ray around it. Runs in the vLLM venv (tests/vllm_plugin/make_venv.sh):

    .vllm-venv/bin/python benchmarks/vllm_engine_start.py WORKDIR [--rounds 3] [--layers 8]

A random Llama (bf16, vocab 32000, hidden 1024, head size 64) is written as a stock safetensors
folder; every start reads those same files (the Loader has no SSD tier, so fastckpt reads the
folder itself, not a converted copy). "cold" drops the files from the page cache first
(``posix_fadvise``; a VM's host may still cache them). Each round runs the four starts, their
order rotated round to round; each engine answers one request and is shut down (as on eviction)
before the next starts. Prints a table of medians (and min-max) and one "ENGINE_START {json}".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

VLLM_ARGS = {
    "dtype": "bfloat16",
    "max_model_len": 256,
    "max_num_seqs": 4,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 64 << 20,
}
PROMPT = [1, 17, 42, 99, 7]
CASES = ("plain-cold", "plain-warm", "fastckpt-cold", "fastckpt-dram")


class WeightsTimer(logging.Handler):
    """vLLM's "Loading weights took X seconds" (its default loader and the plug-in log it)."""

    pattern = re.compile(r"Loading weights took ([0-9.]+) seconds")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if m:
            self.seen.append(float(m.group(1)))


def build(root: str, layers: int) -> str:
    import torch
    import transformers

    out = os.path.join(root, f"llama-{layers}l")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def drop(path: str) -> None:
    from fastckpt.io_engine import drop_page_cache

    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            drop_page_cache(os.path.join(path, name))


def warm(path: str) -> None:
    """Read the files once, so that they are in the page cache."""
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as fh:
                while fh.read(16 << 20):
                    pass


def one_start(entry: Any, loader: Any, timer: WeightsTimer) -> dict[str, Any]:
    import asyncio

    from fastckpt.integrations.ray_serve.vllm_runner import load_vllm

    timer.seen.clear()
    t0 = time.perf_counter()
    runner = load_vllm(entry, "cpu", loader, engine_args=VLLM_ARGS)
    ready = time.perf_counter() - t0

    async def first() -> list[int]:
        return [t async for t in runner.stream(PROMPT, 4)]

    tokens = asyncio.run(first())
    t1 = time.perf_counter()
    runner.release()
    return {
        "start_s": ready,
        "weights_s": timer.seen[-1] if timer.seen else None,
        "shutdown_s": time.perf_counter() - t1,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    path = build(a.workdir, a.layers)

    import fastckpt
    from fastckpt.integrations.ray_serve.catalog import Catalog
    from fastckpt.integrations.ray_serve.vllm_runner import import_vllm

    import_vllm()
    timer = WeightsTimer()
    entry = Catalog.from_dict({"models": {"m": {"path": path}}})["m"]
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    one_start(entry, None, timer)  # first engine of the process: one-time costs, not counted
    # after the first engine start, which configures vLLM's logging (replacing its handlers)
    logging.getLogger("vllm").addHandler(timer)
    for r in range(a.rounds):
        order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
        loader = fastckpt.Loader(dram_tier_bytes=1 << 30, ssd_tier_bytes=0, gpu_tier_bytes=0)
        for case in order:
            if case == "fastckpt-dram":
                assert loader.prefetch(path, "dram", "cpu").result()  # held before it is timed
            if case.endswith("-cold"):
                drop(path)
            if case == "plain-warm":
                warm(path)
            if case == "fastckpt-cold":
                loader.close()
                loader = fastckpt.Loader(
                    dram_tier_bytes=1 << 30, ssd_tier_bytes=0, gpu_tier_bytes=0
                )
            got = one_start(entry, loader if case.startswith("fastckpt") else None, timer)
            results[case].append(got)
            print(case, json.dumps(got), flush=True)
        loader.close()
    ref = results["plain-cold"][0]["tokens"]
    same = all(g["tokens"] == ref for runs in results.values() for g in runs)
    print(f"\n{entry.nbytes / 1e6:.0f} MB checkpoint, {a.rounds} rounds, same tokens: {same}")
    print(f"{'start':<15} {'engine ready s':>22} {'weights s (vLLM log)':>24}")
    summary = {}
    for case, runs in results.items():
        st = [g["start_s"] for g in runs]
        ws = [g["weights_s"] for g in runs if g["weights_s"] is not None]
        summary[case] = {
            "start_s": statistics.median(st),
            "start_range_s": [min(st), max(st)],
            "weights_s": statistics.median(ws) if ws else None,
            "weights_range_s": [min(ws), max(ws)] if ws else None,
        }
        w = f"{statistics.median(ws):.2f} ({min(ws):.2f}-{max(ws):.2f})" if ws else "-"
        print(f"{case:<15} {statistics.median(st):>8.2f} ({min(st):.2f}-{max(st):.2f}) {w:>24}")
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}, python {sys.version.split()[0]}"
    print(machine)
    print(
        "ENGINE_START "
        + json.dumps(
            {"nbytes": entry.nbytes, "same_tokens": same, "summary": summary, "machine": machine}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
