"""Benchmark scenario ``vllm``: weight-loading time inside vLLM with load format ``fastckpt`` beside
vLLM's default loader (``safetensors``) and, where installed, ``runai_streamer`` and
``fastsafetensors``, warm and cold, on the same bytes. Run it with the interpreter that has vLLM:

    python -m fastckpt.integrations.vllm.bench [--size-mb 500] [--rounds 3] [--json out.json]

It writes one random LLaMA-like model (bf16, built from a config, no downloads) as a stock
safetensors folder and a fastckpt-converted copy. Every loader in the comparison reads the stock
folder (the same files, so the host's per-file caching treats them alike); ``fastckpt`` on the
converted copy is reported on its own row because it reads other files.

The time is that of the loader's ``load_weights`` inside vLLM's worker (reading the checkpoint and
filling the model's parameters; model construction and post-processing excluded), taken by one
timer around whichever loader vLLM picks, because ``runai_streamer`` logs no time of its own.
vLLM's own "Loading weights took N seconds" line (its default loader; the fastckpt loader logs the
same words) is kept beside it as ``vllm_log_s``. Each round runs in a fresh interpreter with
vLLM's engine in-process; each loader first loads once untimed (imports, first-call costs),
then the timed loads follow in an order that rotates from round to round. ``cold`` drops the
model's files from the page cache (posix_fadvise) before a load; ``warm`` reads them once
before.

Hook for the harness: ``run(size_bytes, rounds, workdir) -> dict`` returns the rows; a harness
scenario calls it (in the vLLM interpreter) and renders them like its other scenarios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from fastckpt.serve.spawn import start_daemon as spawn_daemon
from fastckpt.serve.spawn import stop_daemon

_WEIGHTS_RE = re.compile(r"Loading weights took ([0-9.]+) seconds")

_RANK_RE = re.compile(r"fastckpt rank tp=(\d+)/\d+ .*: read (\d+) bytes for (\d+) bytes")

# (row name, load format, folder: "stock" | "converted" | "export", python module that must be
# be installed); the row "fastckpt (daemon)" reads the converted copy through `fastckpt serve`.
LOADERS: tuple[tuple[str, str, str, str | None], ...] = (
    ("safetensors", "safetensors", "stock", None),
    ("fastckpt", "fastckpt", "stock", None),
    ("runai_streamer", "runai_streamer", "stock", "runai_model_streamer"),
    ("fastsafetensors", "fastsafetensors", "stock", "fastsafetensors"),
    ("fastckpt (converted copy)", "fastckpt", "converted", None),
    ("fastckpt (per-rank export)", "fastckpt", "export", None),
    ("fastckpt (daemon)", "fastckpt", "converted", None),
)


def make_model(workdir: str, size_bytes: int) -> tuple[str, str]:
    """Write a LLaMA-like bf16 model of about ``size_bytes`` and its fastckpt copy (once)."""
    import torch
    import transformers

    import fastckpt

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)  # bf16 bytes, MHA
    layers = max(1, round((size_bytes - 2 * 2 * vocab * hidden) / per_layer))
    stock = os.path.join(workdir, f"llama-{layers}l")
    converted = stock + "-fastckpt"
    if not os.path.exists(os.path.join(stock, "config.json")):
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = transformers.LlamaForCausalLM(cfg).bfloat16()
        model.save_pretrained(stock, max_shard_size="2GB")
        del model
    if not os.path.exists(converted):
        fastckpt.convert(stock, converted)
    return stock, converted


def make_export(stock: str, tp: int) -> str:
    """``fastckpt vllm-export`` of the stock folder for this TP size (once), in a fresh
    interpreter."""
    out = f"{stock}-export-tp{tp}"
    if not os.path.exists(out):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "fastckpt.cli", "vllm-export", stock, out),
                *("--tensor-parallel-size", str(tp), "--dtype", "bfloat16"),
                '--engine-args={"gpu_memory_utilization": 0.1, "seed": 0}',
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"fastckpt vllm-export failed:\n{proc.stdout[-4000:]}")
    return out


def weight_files(folder: str) -> list[str]:
    """The files a load of ``folder`` reads (a per-rank export: every rank's)."""
    out = []
    for root, _, names in os.walk(folder):
        out += [
            os.path.join(root, n)
            for n in names
            if n.endswith(".safetensors") or n.startswith("part-") or n == "fastckpt.index"
        ]
    return sorted(out)


_ROUND = r"""
import gc, json, os, sys, time
import fastckpt.io_engine as io
import vllm.model_executor.model_loader as ml
from vllm import LLM
from vllm.distributed import cleanup_dist_env_and_memory
job = json.loads(sys.argv[1])

# One timer for every loader (runai_streamer logs none): around the chosen loader's
# load_weights, in this process (the engine runs in-process).
_get_model_loader = ml.get_model_loader

def timed_loader(load_config):
    loader = _get_model_loader(load_config)
    inner = loader.load_weights
    def load_weights(model, model_config):
        start = time.perf_counter()
        inner(model, model_config)
        print(f"BENCH_TIMER {time.perf_counter() - start:.6f}", flush=True)
        # the process's peak RSS up to here: model built and weights loaded (vLLM's KV cache,
        # 10% of host memory on its CPU build, comes after)
        print(f"BENCH_RSS {peak_rss()}", flush=True)
    loader.load_weights = load_weights
    return loader

def peak_rss_reset():
    # the kernel's high-water mark of this process's resident memory, reset (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

def peak_rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None

ml.get_model_loader = timed_loader

def prepare(files, cache):
    for f in files:
        if cache == "cold":
            io.drop_page_cache(f)
        else:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

from vllm import SamplingParams
first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)

def load(entry):
    out = {"error": None, "first_token_s": None}
    try:
        gc.collect()
        peak_rss_reset()
        start = time.perf_counter()
        llm = LLM(model=entry["model"], load_format=entry["load_format"], skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=128, max_num_seqs=1, enforce_eager=True,
              gpu_memory_utilization=job["mem"], distributed_executor_backend="uni",
              model_loader_extra_config=entry.get("extra") or {}, seed=0)
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], first_token, use_tqdm=False)
        out["first_token_s"] = time.perf_counter() - start
        del llm
    except Exception as e:  # a peer loader that does not run here: reported, not fatal
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    gc.collect()
    cleanup_dist_env_and_memory()
    return out

for entry in job["warmup"]:
    prepare(entry["files"], "warm")
    got = load(entry)
    print("BENCH_MARK " + json.dumps({"warmup": entry["name"], **got}), flush=True)
for entry in job["timed"]:
    prepare(entry["files"], entry["cache"])
    resident = sum(io.residency(f) * os.path.getsize(f) for f in entry["files"])
    got = load(entry)
    print("BENCH_MARK " + json.dumps({"name": entry["name"], "cache": entry["cache"],
                                      "resident_bytes": resident, **got}), flush=True)
"""


def run_round(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one round (warm-ups, then the timed loads) in a fresh interpreter."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND, json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: timer and log lines stay in order
        text=True,
        env=env,
        timeout=3600,
    )
    log = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM benchmark round failed ({proc.returncode}):\n{log[-5000:]}")
    return parse_round_log(log)


def parse_round_log(log: str) -> list[dict[str, Any]]:
    """The timed samples of one round's log, in order: each BENCH_TIMER line (seconds in the
    loader's ``load_weights``) belongs to the next BENCH_MARK line, and so does vLLM's own
    "Loading weights took" line where the loader logs one (``vllm_log_s``, else None). A failed
    load has no timer and gets ``weights_s=None``."""
    out: list[dict[str, Any]] = []
    pending: float | None = None
    logged: float | None = None
    read: list[tuple[int, int]] = []  # the plug-in's (rank, bytes read)
    rss: int | None = None  # peak RSS of the process once the weights were loaded
    for line in log.splitlines():
        m = _WEIGHTS_RE.search(line)
        r = _RANK_RE.search(line)
        if m:
            logged = float(m.group(1))
        if r:
            read.append((int(r.group(1)), int(r.group(2))))
        if line.startswith("BENCH_TIMER "):
            pending = float(line.split(" ", 1)[1])
        elif line.startswith("BENCH_RSS "):
            value = line.split(" ", 1)[1].strip()
            rss = int(value) if value.isdigit() else None
        elif line.startswith("BENCH_MARK "):
            mark = json.loads(line.split(" ", 1)[1])
            if "warmup" not in mark:
                if mark["error"] is None and pending is None:
                    raise RuntimeError(f"no BENCH_TIMER line before {mark}")
                weights = None if mark["error"] else pending
                out.append(
                    {
                        **mark,
                        "weights_s": weights,
                        "vllm_log_s": logged,
                        "read_nbytes": [n for _, n in sorted(read)],
                        "peak_rss_bytes": rss,
                    }
                )
            pending = logged = rss = None
            read = []
    return out


def available_loaders() -> list[tuple[str, str, str]]:
    return [
        (name, fmt, folder)
        for name, fmt, folder, module in LOADERS
        if module is None or importlib.util.find_spec(module) is not None
    ]


def start_daemon(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    """``fastckpt serve`` over ``workdir`` (the node's DRAM tier), once it answers."""
    sock = os.path.join(workdir, "run", "fastckpt.sock")
    return spawn_daemon(sock, workdir, "8GiB"), sock


def run(
    size_bytes: int, rounds: int, workdir: str, *, caches: tuple[str, ...] = ("warm", "cold")
) -> dict[str, Any]:
    """Measure; returns {"machine": ..., "model": ..., "rows": [...], "samples": [...]}."""
    import vllm

    stock, converted = make_model(workdir, size_bytes)
    folders = {"stock": stock, "converted": converted, "export": make_export(stock, 1)}
    loaders = available_loaders()
    daemon, sock = start_daemon(workdir)
    try:
        entries = [
            {
                "name": name,
                "load_format": fmt,
                "model": folders[folder],
                "files": weight_files(folders[folder]),
                "extra": {"server": sock} if name == "fastckpt (daemon)" else {},
            }
            for name, fmt, folder in loaders
        ]
        samples: list[dict[str, Any]] = []
        for r in range(rounds):
            order = entries[r % len(entries) :] + entries[: r % len(entries)]
            timed = [{**e, "cache": c} for c in caches for e in order]
            samples += run_round({"warmup": entries, "timed": timed, "mem": 0.1})
    finally:
        stop_daemon(daemon)
    nbytes = sum(os.path.getsize(f) for f in weight_files(stock) if f.endswith(".safetensors"))
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
            "vllm": vllm.__version__,
        },
        "model": {"stock": stock, "converted": converted, "nbytes": nbytes},
        "rows": summarise(samples, [(n, f) for n, _, f in loaders], caches, nbytes),
        "samples": samples,
    }


def _median(values: list[Any]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarise(
    samples: list[dict[str, Any]],
    loaders: list[tuple[str, str]],
    caches: tuple[str, ...],
    nbytes: int,
) -> list[dict[str, Any]]:
    """One row per (loader, cache): median and spread of the timed samples (seconds in
    ``load_weights``; vLLM's start to the first token; peak RSS; bytes read per rank), or the
    error."""
    rows: list[dict[str, Any]] = []
    for name, folder in loaders:
        for cache in caches:
            mine = [s for s in samples if s["name"] == name and s["cache"] == cache]
            secs = [s["weights_s"] for s in mine if s["weights_s"] is not None]
            if not secs:
                errors = sorted({str(s["error"]) for s in mine})
                rows.append({"loader": name, "files": folder, "cache": cache, "error": errors[0]})
                continue
            med = statistics.median(secs)
            read = [s.get("read_nbytes") or [] for s in mine if s["weights_s"] is not None]
            rows.append(
                {
                    "loader": name,
                    "files": folder,
                    "cache": cache,
                    "median_s": med,
                    "min_s": min(secs),
                    "max_s": max(secs),
                    "gbps": nbytes / med / 1e9 if med > 0 else None,
                    "n": len(secs),
                    "first_token_s": _median([s.get("first_token_s") for s in mine]),
                    "peak_rss_bytes": _median([s.get("peak_rss_bytes") for s in mine]),
                    "read_nbytes_per_rank": read[0] if read else [],
                }
            )
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"vLLM {result['machine']['vllm']}, {result['machine']['cpus']} CPUs, model "
        f"{result['model']['nbytes'] / 1e9:.2f} GB bf16; seconds in the loader's load_weights "
        "(median, min-max); start = LLM() to the first token; peak RSS of the process",
        "",
        "| loader | files | cache | load_weights s | x safetensors | GB/s | start s | "
        "peak RSS GB | read per rank GB | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {
        r["cache"]: r["median_s"]
        for r in result["rows"]
        if r["loader"] == "safetensors" and "median_s" in r
    }
    for r in result["rows"]:
        if "error" in r:
            failed = f"failed: {r['error']}"
            lines.append(f"| {r['loader']} | {r['files']} | {r['cache']} | {failed} |||||||")
            continue
        gbps = f"{r['gbps']:.2f}" if r["gbps"] else "-"
        ratio = f"{base[r['cache']] / r['median_s']:.2f}" if r["cache"] in base else "-"
        start = f"{r['first_token_s']:.1f}" if r.get("first_token_s") else "-"
        rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r.get("peak_rss_bytes") else "-"
        read = " / ".join(f"{b / 1e9:.2f}" for b in r.get("read_nbytes_per_rank") or []) or "-"
        lines.append(
            f"| {r['loader']} | {r['files']} | {r['cache']} | {r['median_s']:.2f} "
            f"({r['min_s']:.2f}-{r['max_s']:.2f}) | {ratio} | {gbps} | {start} | {rss} | "
            f"{read} | {r['n']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastckpt.integrations.vllm.bench")
    ap.add_argument("--size-mb", type=int, default=500, help="model size in MB (default 500)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="bench_out/vllm")
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    caches = ("warm", "cold") if a.cache == "both" else (a.cache,)
    start = time.perf_counter()
    result = run(a.size_mb * 1_000_000, a.rounds, os.path.abspath(a.workdir), caches=caches)
    result["wall_s"] = time.perf_counter() - start
    print(to_markdown(result))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
