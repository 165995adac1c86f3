"""Accuracy check: calibrate on small checkpoints, predict larger held-out ones, compare.

``python -m fastckpt.sched.accuracy [--train 64,128,256] [--held-out 512,1024] [--device cpu]``

Writes the checkpoints under ``--dir`` (default: a temporary directory next to the profile, i.e.
on the storage being measured), calibrates the ``dram`` (warm: page-cached) and ``disk`` (cold:
evicted) tiers through ``fastckpt.load`` exactly as ``fastckpt calibrate`` does, then loads each
held-out checkpoint ``--repeats`` times per tier, interleaving tiers and sizes, and prints the
prediction against the median measured time (with min-max spread). Nothing is asserted; on a
shared machine the spread says how far to trust a single number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence

from fastckpt.config import sched_profile_path
from fastckpt.sched.calibrate import PREPARE, calibrate, fastckpt_load_fn, write_checkpoints

MiB = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastckpt.sched.accuracy")
    ap.add_argument("--train", default="64,128,256", help="calibration sizes, MiB")
    ap.add_argument("--held-out", default="512,1024", help="predicted sizes, MiB")
    ap.add_argument("--repeats", type=int, default=5, help="measured loads per held-out size")
    ap.add_argument("--calib-repeats", type=int, default=5, help="loads per calibration size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiers", default="dram,disk")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    train = [int(x) * MiB for x in a.train.split(",")]
    held = [int(x) * MiB for x in a.held_out.split(",")]
    tiers = [t for t in a.tiers.split(",") if t]
    base = a.dir or os.path.dirname(sched_profile_path())
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fastckpt-accuracy-", dir=base)
    load = fastckpt_load_fn(a.device)
    try:
        train_ckpts = write_checkpoints(work, train)
        held_ckpts = write_checkpoints(work, held)
        profile, runs = calibrate(
            load, train_ckpts, device=a.device, tiers=tiers, repeats=a.calib_repeats
        )
        for run in runs:
            print(
                f"fit {run.tier}: {run.fit.bandwidth_bps / 1e9:.3f} GB/s + "
                f"{run.fit.overhead_s * 1e3:.2f} ms; samples (bytes, s): "
                + ", ".join(f"({s.nbytes >> 20} MiB, {s.seconds:.4f})" for s in run.samples)
            )
        measured: dict[tuple[str, str], list[float]] = {}
        nbytes: dict[str, int] = {}
        for ckpt in held_ckpts:  # one warm-up load each (first-use costs, page cache filled)
            load(ckpt)
        for r in range(a.repeats):
            order = [(t, c) for t in tiers for c in held_ckpts]
            if r % 2:
                order.reverse()
            for tier, ckpt in order:
                PREPARE[tier](ckpt)
                n, secs = load(ckpt)
                nbytes[ckpt] = n
                measured.setdefault((tier, ckpt), []).append(secs)
        rows = []
        print("| tier | size MiB | predicted s | measured median s (min-max) | error |")
        print("|---|---:|---:|---:|---:|")
        for tier in tiers:
            t = profile.tier(tier)
            for ckpt in held_ckpts:
                xs = measured[(tier, ckpt)]
                med = statistics.median(xs)
                pred = t.predict_s(nbytes[ckpt])
                err = (pred - med) / med
                rows.append(
                    {
                        "tier": tier,
                        "nbytes": nbytes[ckpt],
                        "predicted_s": pred,
                        "measured_s": xs,
                        "median_s": med,
                        "error": err,
                    }
                )
                print(
                    f"| {tier} | {nbytes[ckpt] >> 20} | {pred:.4f} | {med:.4f} "
                    f"({min(xs):.4f}-{max(xs):.4f}) | {err:+.1%} |"
                )
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"profile": profile.as_dict(), "held_out": rows}, fh, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
