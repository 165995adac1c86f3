"""Compare two builds of fastckpt on the same checkpoint, alternated: ``fastckpt bench`` run by
each build's interpreter in turn, round after round (the order flips every round), on the very
same files. Prints and writes a table of medians with min-max per (state, loader, build).

    python benchmarks/compare_builds.py --python-a /path/to/before/.venv/bin/python \\
        --python-b .venv/bin/python --checkpoint /var/tmp/ck/llama-1000000000 --rounds 6 \\
        --out docs/results/some-comparison

The checkpoint is a folder a ``fastckpt bench --keep`` run generated (it has every form), so
both builds read the same bytes; this VM's disk is cached by its host per file, so comparing
builds that read different files would compare the host's cache, not the builds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def run_one(python: str, args: argparse.Namespace, out: str) -> dict[str, Any]:
    cmd = [
        python,
        "-m",
        "fastckpt.bench.cli",
        "--checkpoint",
        args.checkpoint,
        "--device",
        "cpu",
        "--loaders",
        args.loaders,
        "--scenarios",
        args.states,
        "--repeats",
        "1",
        "--skip-ceilings",
        "--verify",
        "none",
        "--workdir",
        args.workdir,
        "--keep",
        "--out",
        out,
    ]
    # from a neutral folder: each interpreter imports its own build, never a source tree here
    os.makedirs(args.workdir, exist_ok=True)
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=args.workdir
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{python} -m fastckpt.bench.cli exited with {done.returncode}:\n{done.stderr[-3000:]}"
        )
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--python-a", required=True, help="interpreter of build A (e.g. before)")
    p.add_argument("--python-b", required=True, help="interpreter of build B (e.g. after)")
    p.add_argument("--label-a", default="before")
    p.add_argument("--label-b", default="after")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--workdir", default="/var/tmp/fastckpt-compare")
    p.add_argument("--loaders", default="fastckpt,fastckpt-st,safetensors")
    p.add_argument("--states", default="cold,warm")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=1200)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    builds = [(args.label_a, args.python_a), (args.label_b, args.python_b)]
    samples: dict[tuple[str, str, str], list[float]] = {}
    for rnd in range(args.rounds):
        order = builds if rnd % 2 == 0 else builds[::-1]
        for label, python in order:
            t0 = time.time()
            data = run_one(python, args, os.path.join(args.out, f"round{rnd}-{label}"))
            for row in data["summary"]:
                if row.get("median_s") is None or not row.get("ok_runs"):
                    continue
                key = (row["scenario"], row["loader"], label)
                samples.setdefault(key, []).append(float(row["median_s"]))
            load = os.getloadavg()[0]
            print(f"round {rnd} {label}: {time.time() - t0:.0f} s (load {load:.1f})", flush=True)
    lines = [
        f"| state | loader | {args.label_a} median s (min-max) | {args.label_b} median s "
        f"(min-max) | {args.label_b} / {args.label_a} |",
        "|---|---|---:|---:|---:|",
    ]
    summary = []
    for state in args.states.split(","):
        for loader in args.loaders.split(","):
            a = samples.get((state, loader, args.label_a), [])
            b = samples.get((state, loader, args.label_b), [])
            if not a or not b:
                continue
            ma, mb = statistics.median(a), statistics.median(b)
            lines.append(
                f"| {state} | {loader} | {ma:.3f} ({min(a):.3f}-{max(a):.3f}) | {mb:.3f} "
                f"({min(b):.3f}-{max(b):.3f}) | {mb / ma:.2f} |"
            )
            summary.append({"state": state, "loader": loader, "a": a, "b": b})
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"labels": [args.label_a, args.label_b], "rows": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
