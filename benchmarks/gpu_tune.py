"""Sweep the GPU pipeline's knobs on one checkpoint, in one process, warm page cache.

    python benchmarks/gpu_tune.py CHECKPOINT_DIR [--device cuda:0] [--json OUT.json]

Measures, for each configuration, a first load (ring creation included: what a fresh process
pays) and the median of repeated loads (ring reused), plus how long pinning one slot takes with
each method. Prints a table; the numbers pick the defaults in fastckpt/config.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def _measure(path: str, device: str, overrides: dict[str, Any], repeats: int) -> dict[str, Any]:
    import torch

    import fastckpt
    from fastckpt.loader import staging

    staging._ring = None  # every configuration pays for its own ring once
    env = {f"FASTCKPT_{k.upper()}": str(v) for k, v in overrides.items()}
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        times = []
        first_stats = None
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tensors, stats = fastckpt.load(path, device, stats=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                first_stats = stats
                first = dt
            else:
                times.append(dt)
            del tensors
        nbytes = first_stats.nbytes if first_stats else 0
        med = statistics.median(times) if times else float("nan")
        ring = staging.current_ring()
        return {
            "config": overrides,
            "first_s": first,
            "first_gbps": nbytes / first / 1e9,
            "median_s": med,
            "median_gbps": nbytes / med / 1e9,
            "spread_s": [min(times), max(times)] if times else [],
            "path": first_stats.path_taken if first_stats else "",
            "pin_method": ring.method if ring else None,
            "slots": ring.slots if ring else 0,
            "read_wait_s": first_stats.read_wait_s if first_stats else 0.0,
            "copy_wait_s": first_stats.copy_wait_s if first_stats else 0.0,
        }
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pin_cost(slot_bytes: int) -> dict[str, float]:
    from fastckpt.loader.staging import Slot

    out = {}
    for method in ("alloc", "register"):
        try:
            t0 = time.perf_counter()
            Slot(0, slot_bytes, method)
            out[method] = time.perf_counter() - t0
        except Exception as exc:  # report, keep going
            out[method] = float("nan")
            print(f"pin {method}: {exc}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.cuda.init()
    torch.empty(1, device=args.device)
    # read once so every configuration sees a warm page cache
    import fastckpt

    fastckpt.load(args.checkpoint, "cpu")

    pins = {str(n >> 20) + "MiB": _pin_cost(n) for n in (8 << 20, 32 << 20)}
    configs: list[dict[str, Any]] = [
        {"ring_slot_bytes": 32 << 20, "ring_bytes": 512 << 20, "pin_method": "register"},
        {"ring_slot_bytes": 32 << 20, "ring_bytes": 512 << 20, "pin_method": "alloc"},
        {"ring_slot_bytes": 16 << 20, "ring_bytes": 256 << 20, "pin_method": "register"},
        {"ring_slot_bytes": 8 << 20, "ring_bytes": 128 << 20, "pin_method": "register"},
        {"ring_slot_bytes": 64 << 20, "ring_bytes": 1024 << 20, "pin_method": "register"},
        {"ring_slot_bytes": 16 << 20, "ring_bytes": 256 << 20, "copy_streams": 2},
        {"ring_slot_bytes": 16 << 20, "ring_bytes": 256 << 20, "chunk_bytes": 1 << 20},
        {"ring_slot_bytes": 16 << 20, "ring_bytes": 256 << 20, "chunk_bytes": 8 << 20},
    ]
    rows = []
    for cfg in configs:
        try:
            rows.append(_measure(args.checkpoint, args.device, cfg, args.repeats))
        except Exception as exc:
            rows.append({"config": cfg, "error": repr(exc)})
        r = rows[-1]
        if "error" in r:
            print(f"{cfg}: ERROR {r['error']}", flush=True)
        else:
            print(
                f"{json.dumps(cfg)}: first {r['first_s']:.3f}s ({r['first_gbps']:.1f} GB/s), "
                f"median {r['median_s']:.3f}s ({r['median_gbps']:.1f} GB/s) "
                f"slots={r['slots']} pin={r['pin_method']} path={r['path']}",
                flush=True,
            )
    print("pin cost per slot (s):", json.dumps(pins))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pin_cost_s": pins, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
