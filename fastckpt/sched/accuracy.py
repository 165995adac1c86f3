"""Accuracy check: calibrate on small checkpoints, predict larger held-out ones, compare.

``python -m fastckpt.sched.accuracy [--train 64,128,256] [--held-out 512,1024] [--device cpu]``

Writes the checkpoints under ``--dir`` (default: a temporary directory next to the profile, i.e.
on the storage being measured). Per tier (``dram``: page-cached, warm; ``disk``: evicted, cold),
every round loads all checkpoints through ``fastckpt.load`` (sizes forward, then backward), the
first round is warm-up; the calibration checkpoints' loads are fitted exactly as
``fastckpt calibrate`` fits them, and the fit's prediction for each held-out checkpoint is
compared with its median measured time (with min-max spread). Nothing is asserted; on a
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
from fastckpt.sched.calibrate import PREPARE, fastckpt_load_fn, write_checkpoints
from fastckpt.sched.profile import Sample, TierFit, fit_tier, profile_from_fits

MiB = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastckpt.sched.accuracy")
    ap.add_argument("--train", default="64,128,256", help="calibration sizes, MiB")
    ap.add_argument("--held-out", default="512,1024", help="predicted sizes, MiB")
    ap.add_argument("--repeats", type=int, default=5, help="measured rounds after warm-up")
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
        # Calibration and held-out loads alternate within every round (sizes forward, then
        # backward), so that the contention of a shared machine hits both alike; the first
        # round is warm-up and discarded, exactly as in `fastckpt calibrate`.
        fits: dict[str, TierFit] = {}
        measured: dict[tuple[str, str], list[float]] = {}
        nbytes: dict[str, int] = {}
        everything = train_ckpts + held_ckpts
        for tier in tiers:
            samples: list[Sample] = []
            for r in range(1 + a.repeats):
                order = everything if r % 2 == 0 else list(reversed(everything))
                for ckpt in order:
                    PREPARE[tier](ckpt)
                    n, secs = load(ckpt)
                    nbytes[ckpt] = n
                    if ckpt in train_ckpts:
                        samples.append(Sample(n, secs))
                    elif r > 0:
                        measured.setdefault((tier, ckpt), []).append(secs)
            fits[tier] = fit_tier(samples, warmup=len(train_ckpts))
            f = fits[tier]
            print(
                f"fit {tier}: {f.bandwidth_bps / 1e9:.3f} GB/s + {f.overhead_s * 1e3:.2f} ms "
                f"(worst residual {f.max_rel_residual:.1%}); calibration samples (MiB, s): "
                + ", ".join(f"({s.nbytes >> 20}, {s.seconds:.4f})" for s in samples)
            )
        profile = profile_from_fits(a.device, fits)
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
