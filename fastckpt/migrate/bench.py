"""Measure migration on this machine: ``python -m fastckpt.migrate.bench``.

1. Recompute cost: prefill time of the reference engine by token count; fits
   ``c0 + c1 n + c2 n^2`` on half of the points and reports the error on the other half
   (interpolation) and on contexts longer than any fitted one (extrapolation), beside a linear
   fit's error there.
2. Migrations between two processes (this one is the source, decoding on a thread; a
   ``fastckpt.migrate.serve`` process is the target): downtime (freeze to commit), total time,
   rounds and tokens per round by context length, with the default threshold (20 tokens).

The model is a random Llama built from a config, saved, converted and loaded with
``fastckpt.load_model`` on both sides (nothing is downloaded). Writes JSON (``--out``) and prints
markdown tables with the machine's description and load. Timings on a shared machine vary:
medians with min-max over ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastckpt.migrate.costmodel import RecomputeCostModel, fit

PREFILL_TOKENS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
EXTRAPOLATE_FROM = 1024  # the extrapolation fit sees only counts up to this
CONTEXTS = (128, 512, 1024, 2048)


def build_model(root: Path, *, hidden: int, layers: int, vocab: int, max_pos: int) -> Path:
    import torch
    import transformers

    import fastckpt

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=max_pos,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    src = root / "src"
    model.save_pretrained(src, safe_serialization=True)
    dst = root / "fck"
    fastckpt.convert(src, dst, progress=False)
    return dst


def _median_range(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure_prefill(
    engine: Any, counts: tuple[int, ...], repeats: int, clock: str = "wall"
) -> tuple[list[tuple[int, float]], dict[int, list[float]]]:
    """Seconds to prefill n random tokens onto an empty cache, for each n.

    The counts are visited round-robin, alternating direction, ``repeats`` times, so a change
    of machine load spreads over all counts. Returns the fastest time per count (the compute is
    deterministic, so the minimum is the cost least inflated by other processes on a shared
    machine) and every sample. ``clock="thread"`` measures the calling thread's CPU time instead
    of wall time: on a CPU run with one torch thread the prefill computes on this thread, and on
    an overloaded machine its CPU time is what the prefill would take with a core to itself
    (wall time there is mostly waiting for a core). Never use it for GPU runs.
    """
    import random

    from fastckpt.migrate.reference import _Sequence

    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.thread_time
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    _Sequence(engine).feed([1, 2, 3])  # warm-up
    samples: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(repeats):
        for n in counts if r % 2 == 0 else counts[::-1]:
            seq = _Sequence(engine)
            ids = [rng.randrange(vocab) for _ in range(n)]
            t0 = now()
            seq.feed(ids)
            samples[n].append(now() - t0)
    return [(n, min(samples[n])) for n in counts], samples


def fit_report(
    points: list[tuple[int, float]],
    meta: dict[str, str],
    extrapolate_from: int = EXTRAPOLATE_FROM,
) -> dict[str, Any]:
    train, held = points[::2], points[1::2]
    model = fit(train, **meta).with_held_out(held)
    short = [p for p in points if p[0] <= extrapolate_from]
    far = [p for p in points if p[0] > extrapolate_from]
    quad_short = fit(short, **meta)
    # the straight line through the fitted range (least squares on n, relative weights)
    lin = _fit_linear(short)
    extrap = {
        str(n): {
            "measured_s": t,
            "quadratic_rel_err": quad_short.predict_s(n) / t - 1,
            "linear_rel_err": (lin[0] + lin[1] * n) / t - 1,
        }
        for n, t in far
    }
    # the model to ship is fitted on all points; its error estimate is the held-out one above
    # (its own error on points it was fitted on would flatter it)
    full = dataclasses.replace(fit(points, **meta), held_out=model.held_out)
    return {
        "points": [[n, t] for n, t in points],
        "held_out_model": model.to_dict(),
        "extrapolation_from_tokens": extrapolate_from,
        "extrapolation": extrap,
        "model": full.to_dict(),
    }


def _fit_linear(points: list[tuple[int, float]]) -> tuple[float, float]:
    sw = swx = swxx = swy = swxy = 0.0
    for n, t in points:
        w = 1.0 / (t * t)
        sw, swx, swxx = sw + w, swx + w * n, swxx + w * n * n
        swy, swxy = swy + w * t, swxy + w * n * t
    det = sw * swxx - swx * swx
    return (swxx * swy - swx * swxy) / det, (sw * swxy - swx * swy) / det


def measure_migrations(
    engine: Any, model_dir: Path, contexts: tuple[int, ...], repeats: int, threads: int
) -> list[dict[str, Any]]:
    import random

    from fastckpt.migrate.driver import Outcome, migrate
    from fastckpt.migrate.remote import RemoteTarget
    from fastckpt.migrate.state import SamplingParams, StopCriteria
    from fastckpt.migrate.transport import SocketTransport

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastckpt.migrate.serve",
            "--exit-on-stdin-eof",
            "--model",
            str(model_dir),
            "--threads",
            str(threads),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    _, host, port = proc.stdout.readline().split()
    rng = random.Random(1)
    vocab = engine.model.config.vocab_size
    rows = []
    try:
        with SocketTransport(host, int(port), timeout_s=600) as transport:
            k = 0
            for ctx in contexts:
                runs = []
                for _ in range(repeats):
                    k += 1
                    rid = f"bench-{k}"
                    prompt = [rng.randrange(vocab) for _ in range(ctx)]
                    src = engine.start(
                        rid,
                        prompt,
                        sampling=SamplingParams(temperature=1.0, seed=k),
                        stop=StopCriteria(max_new_tokens=100_000),
                    )
                    src.run(1)  # the source is decoding: its prompt is prefilled
                    t_dec = time.perf_counter()
                    src.run(8)
                    decode_s = (time.perf_counter() - t_dec) / 8
                    src.start_background()
                    remote = RemoteTarget(transport, rid)
                    report = migrate(src, remote)
                    if report.outcome is Outcome.COMMITTED:
                        remote.cancel()
                        remote.result(timeout_s=60)
                    else:
                        src.release()
                    runs.append({**report.to_dict(), "decode_s_per_token": decode_s})
                rows.append({"context_tokens": ctx, "runs": runs})
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    lines.append(
        f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), load average {m['loadavg'][0]:.1f} at start, "
        f"{result['machine_end_loadavg'][0]:.1f} at end; model {result['model_desc']}."
    )
    rc = result["recompute"]
    mod = rc["model"]
    ho = rc["held_out_model"]["held_out"]
    lines += [
        "",
        f"Recompute (prefill) time, {result.get('prefill_clock', 'wall')} clock (fastest of "
        f"{len(next(iter(rc['samples'].values())))} interleaved samples per count), fitted "
        "t(n) = c0 + c1 n + c2 n^2:",
        "",
        f"- c0 = {mod['c0_s'] * 1e3:.3f} ms, c1 = {mod['c1_s_per_token'] * 1e6:.3f} us/token, "
        f"c2 = {mod['c2_s_per_token2'] * 1e9:.4f} ns/token^2 (fit on all {len(rc['points'])} "
        "counts)",
        f"- held-out error (fit on every other count, tested on the rest, {ho['points']} "
        f"points): mean {ho['mean_abs_rel_err'] * 100:.1f}%, max "
        f"{ho['max_abs_rel_err'] * 100:.1f}%",
    ]
    for n, e in rc["extrapolation"].items():
        lines.append(
            f"- extrapolation to {n} tokens from a fit up to {rc['extrapolation_from_tokens']}: "
            f"quadratic {e['quadratic_rel_err'] * 100:+.1f}%, linear "
            f"{e['linear_rel_err'] * 100:+.1f}% (measured {e['measured_s'] * 1e3:.1f} ms)"
        )
    lines += ["", "| tokens | " + " | ".join(str(n) for n, _ in rc["points"]) + " |"]
    lines.append("|---" * (len(rc["points"]) + 1) + "|")
    lines.append("| prefill ms | " + " | ".join(f"{t * 1e3:.1f}" for _, t in rc["points"]) + " |")
    lines += [
        "",
        f"Migrations (threshold 20 tokens), median (min-max) over {result['repeats']} runs:",
        "",
        "| context | outcome | decode ms/token | rounds | tokens per round | downtime ms "
        "| total ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["migrations"]:
        runs = row["runs"]
        ok = [r for r in runs if r["outcome"] == "committed"]
        outcomes = ", ".join(sorted({r["outcome"] for r in runs}))
        if not ok:
            lines.append(f"| {row['context_tokens']} | {outcomes} | | | | | |")
            continue
        dt = _median_range([r["downtime_s"] * 1e3 for r in ok])
        tt = _median_range([r["total_s"] * 1e3 for r in ok])
        dec = statistics.median(r["decode_s_per_token"] * 1e3 for r in ok)
        rounds = "/".join(str(r["rounds"]) for r in ok)
        per = "; ".join(
            "+".join(str(x) for x in r["tokens_per_round"]) + f" (+{r['final_tokens']})" for r in ok
        )
        lines.append(
            f"| {row['context_tokens']} | {outcomes} | {dec:.1f} | {rounds} | {per} | "
            f"{dt['median']:.1f} ({dt['min']:.1f}-{dt['max']:.1f}) | "
            f"{tt['median']:.0f} ({tt['min']:.0f}-{tt['max']:.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastckpt.migrate.bench", description=__doc__)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=3, help="migrations per context length")
    p.add_argument("--prefill-repeats", type=int, default=7, help="samples per token count")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    p.add_argument("--prefill-tokens", default=",".join(map(str, PREFILL_TOKENS)))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="prefill timing: wall time, or this thread's CPU time (CPU, one thread, busy host)",
    )
    p.add_argument("--extrapolate-from", type=int, default=EXTRAPOLATE_FROM)
    p.add_argument("--skip-migrations", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fastckpt.migrate.reference import ReferenceEngine

    torch.set_num_threads(args.threads)
    counts = tuple(int(x) for x in args.prefill_tokens.split(","))
    contexts = tuple(int(x) for x in args.contexts.split(","))
    max_pos = max(*counts, *contexts) + 1024
    result: dict[str, Any] = {"machine": machine(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="fastckpt-migrate-bench-") as tmp:
        model_dir = build_model(
            Path(tmp), hidden=args.hidden, layers=args.layers, vocab=args.vocab, max_pos=max_pos
        )
        engine = ReferenceEngine.from_checkpoint(model_dir)
        result["model_desc"] = (
            f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
            "float32, CPU"
        )
        meta = {"engine": "fastckpt.migrate.reference", "device": "cpu", "dtype": "float32"}
        points, samples = measure_prefill(engine, counts, args.prefill_repeats, args.clock)
        result["prefill_clock"] = args.clock
        result["recompute"] = fit_report(points, meta, args.extrapolate_from)
        result["recompute"]["samples"] = {str(n): xs for n, xs in samples.items()}
        result["migrations"] = (
            []
            if args.skip_migrations
            else measure_migrations(engine, model_dir, contexts, args.repeats, args.threads)
        )
    result["machine_end_loadavg"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    # the shipped model is plain data: an estimator reads this dict without importing migrate
    RecomputeCostModel.from_dict(result["recompute"]["model"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
