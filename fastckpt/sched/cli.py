"""``fastckpt calibrate`` and ``fastckpt estimate CHECKPOINT`` (registered in fastckpt/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from fastckpt.config import sched_profile_path
from fastckpt.sched.model import ModelSpec, SchedError, make_server
from fastckpt.sched.profile import MachineProfile


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s) * (1 << 20)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SchedError(
            f"--sizes {text!r}: expected comma-separated MiB, e.g. 64,128,256"
        ) from None
    if len(set(sizes)) < 2 or min(sizes) < 1 << 20:
        raise SchedError(f"--sizes {text!r}: need at least 2 different sizes of >= 1 MiB")
    return sizes


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        default="64,128,256",
        help="checkpoint sizes in MiB to load (default 64,128,256); at least two",
    )
    p.add_argument("--repeats", type=int, default=3, help="measured loads per size and tier")
    p.add_argument("--device", default="cpu", help="load target: cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--tiers",
        default="dram,disk",
        help="tiers to measure: dram (page-cached files), disk (evicted files)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="directory on the storage to measure, for temporary checkpoints "
        "(default: next to the profile)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="profile path (default: $FASTCKPT_SCHED_PROFILE, else "
        "~/.cache/fastckpt/sched-profile.json)",
    )
    p.add_argument("--json", action="store_true", help="print the profile as JSON")


def run_calibrate(args: argparse.Namespace) -> int:
    from fastckpt.sched.calibrate import calibrate, fastckpt_load_fn, write_checkpoints

    sizes = _sizes(args.sizes)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if args.repeats < 1:
        raise SchedError("--repeats must be >= 1")
    path = args.profile or sched_profile_path()
    base = args.dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fastckpt-calibrate-", dir=base)
    try:
        ckpts = write_checkpoints(work, sizes)
        profile, runs = calibrate(
            fastckpt_load_fn(args.device),
            ckpts,
            device=args.device,
            tiers=tiers,
            repeats=args.repeats,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    profile.save(path)
    if args.json:
        print(json.dumps(profile.as_dict(), indent=2, sort_keys=True))
    else:
        for run in runs:
            f = run.fit
            print(
                f"{run.tier:5s} {f.bandwidth_bps / 1e9:7.3f} GB/s + {f.overhead_s * 1e3:7.2f} ms "
                f"overhead ({f.used} loads of {len(f.sizes)} sizes, {f.discarded} warm-up "
                f"discarded, worst fit residual {f.max_rel_residual:.1%})"
            )
        print(f"profile written to {path}")
    return 0


def _secs(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.3f} s"


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint (fastckpt directory or safetensors)")
    p.add_argument("--profile", default=None, help="profile path (default: as for calibrate)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")


def run_estimate(args: argparse.Namespace) -> int:
    from fastckpt.format.reader import read_index
    from fastckpt.sched.estimate import load_estimates

    profile = MachineProfile.load(args.profile or sched_profile_path())
    nbytes = read_index(args.checkpoint).nbytes
    tiers = profile.speeds()
    names = [t.name for t in tiers]
    server = make_server("this machine", tiers, gpus=0, everywhere=names)
    ests = load_estimates(
        server, ModelSpec(os.path.basename(os.path.normpath(args.checkpoint)), nbytes, gpus=0)
    )
    if args.json:
        out = [
            {
                "tier": e.tier,
                "total_s": e.total_s,
                **e.parts,
                "nbytes": e.nbytes,
                "bandwidth_bps": e.bandwidth_bps,
            }
            for e in ests
        ]
        print(json.dumps({"device": profile.device, "estimates": out}, indent=2))
        return 0
    print(f"{args.checkpoint}: {nbytes / 1e9:.3f} GB, load to {profile.device}")
    for e in ests:
        t = profile.tier(e.tier)
        refined = f", refined by {t.observations} loads" if t.observations else ""
        print(
            f"  {e.tier:6s} {_secs(e.total_s):>10s} = overhead {_secs(e.overhead_s)} + "
            f"{e.nbytes / 1e9:.3f} GB / {e.bandwidth_bps / 1e9:.3f} GB/s "
            f"({_secs(e.transfer_s)}){refined}"
        )
    return 0
