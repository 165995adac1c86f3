"""``fastckpt bench``: measure every loader on one checkpoint, the same way, beside the ceilings
(``--scenario load``, the default), or run another scenario of ``fastckpt.bench.harness``
(its docstring lists them).

``add_arguments(parser)`` and ``run(args)`` plug into the ``fastckpt`` command;
``main(argv)`` (and ``benchmarks/bench_load.py``) run it on its own. Exit status: 0 when every
fastckpt measurement succeeded and every bitwise check passed, 1 otherwise (a peer that fails is
reported, not fatal), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
from types import FrameType

from fastckpt.bench import harness
from fastckpt.bench import loaders as _loaders
from fastckpt.bench import scenarios as _scenarios
from fastckpt.bench.common import log
from fastckpt.bench.runner import BenchError, Options, Runner
from fastckpt.rules.units import format_bytes, parse_size

DEFAULT_WORKDIR = os.path.join(tempfile.gettempdir(), "fastckpt-bench")


def _scenario_name(text: str) -> str:
    """argparse type of ``--scenario``: a registered scenario, with a hint for the near misses
    (a cache state given here, a typo)."""
    import difflib

    known = ("load", *harness.SCENARIOS)
    name = text.strip()
    if name in known:
        return name
    if name.lower() in _scenarios.NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a cache state, not a scenario: give it with --states {name.lower()} "
            f"(of {', '.join(_scenarios.NAMES)}); --scenario picks what to measure, one of "
            f"{', '.join(known)}"
        )
    close = difflib.get_close_matches(name.lower().replace("_", "-"), known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise argparse.ArgumentTypeError(f"unknown scenario {text!r}{hint} (known: {', '.join(known)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        default="load",
        type=_scenario_name,
        metavar="NAME",
        help="what to measure: load (every loader on one checkpoint, default); "
        + "; ".join(f"{n} ({harness.help_of(n)})" for n in harness.SCENARIOS),
    )
    src = parser.add_argument_group("checkpoint")
    src.add_argument(
        "--size",
        default="2GB",
        help="generate a LLaMA-like bf16 checkpoint of about this size (default 2GB)",
    )
    src.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="use this checkpoint instead (stock safetensors file/folder, or a folder a previous "
        "--keep run generated)",
    )
    src.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"where checkpoints are generated (on the disk under test; default {DEFAULT_WORKDIR})",
    )
    src.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    src.add_argument(
        "--shard-size", default="auto", help="safetensors shard cap (default: 2 shards, <= 4GiB)"
    )
    src.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoint (reused next time)"
    )
    run = parser.add_argument_group("measurement")
    run.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    run.add_argument(
        "--states",
        dest="scenarios",
        metavar="STATES",
        default=",".join(_scenarios.NAMES),
        help="cache states to measure in, comma-separated, of "
        f"{', '.join(_scenarios.NAMES)} (default all; the other scenarios use cold and warm)",
    )
    # the name this option had before --states (kept for scripts; not shown)
    run.add_argument("--scenarios", dest="scenarios", help=argparse.SUPPRESS)
    run.add_argument(
        "--loaders",
        default="all",
        help=f"comma-separated, of {', '.join(_loaders.LOADERS)}; default all that are installed",
    )
    run.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds (default 3; medians reported)"
    )
    run.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="skip later rounds that would not finish within this many seconds (0 = no limit)",
    )
    run.add_argument(
        "--verify",
        choices=("first", "all", "none"),
        default="first",
        help="bitwise check in the first round of each loader and scenario (default), in "
        "every round, or never",
    )
    run.add_argument("--skip-ceilings", action="store_true", help="do not measure the ceilings")
    run.add_argument(
        "--worker-timeout-s", type=float, default=900.0, help="limit for one measurement"
    )
    run.add_argument("--tmpfs-dir", default="/dev/shm", help="memory filesystem for 'tmpfs'")
    run.add_argument(
        "--python", default=sys.executable, help="interpreter for the worker processes"
    )
    parser.add_argument(
        "--out", default="bench_out", help="folder for results.json/.md/.png (default bench_out)"
    )
    served: dict[str, list[str]] = {}  # module -> the scenarios it serves
    for name in harness.SCENARIOS:
        served.setdefault(harness.SCENARIOS[name], []).append(name)
    for names in served.values():
        title = f"scenario{'s' if len(names) > 1 else ''} {', '.join(names)}"
        harness.module_of(names[0]).add_arguments(parser.add_argument_group(title))


def _options(args: argparse.Namespace) -> Options:
    device = str(args.device).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {args.device!r}: expected cpu or cuda:N")
    if device == "cuda":
        device = "cuda:0"
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be at least 1")
    if args.time_budget_s < 0:
        raise ValueError(f"--time-budget-s {args.time_budget_s}: must be >= 0")
    if args.worker_timeout_s <= 0:
        raise ValueError(f"--worker-timeout-s {args.worker_timeout_s}: must be > 0")
    size = parse_size(args.size)
    if not args.checkpoint and size < 1_000_000:
        raise ValueError(f"--size {args.size}: use at least 1MB")
    shard = None if args.shard_size == "auto" else parse_size(args.shard_size)
    if shard is not None and shard < 4096:
        raise ValueError(f"--shard-size {args.shard_size}: use at least 4KiB")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file or folder")
    try:
        states = _scenarios.parse_scenarios(args.scenarios)
    except ValueError:
        given = [s.strip() for s in str(args.scenarios).split(",")]
        meant = [s for s in given if s in ("load", *harness.SCENARIOS)]
        if meant:
            raise ValueError(
                f"--states {args.scenarios}: {meant[0]} is a scenario (what to measure), not a "
                f"cache state: --scenario {meant[0]}"
            ) from None
        raise
    names = _loaders.resolve_names(args.loaders)
    explicit = str(args.loaders).strip().lower() not in ("", "all")
    return Options(
        workdir=os.path.abspath(args.workdir),
        out_dir=os.path.abspath(args.out),
        device=device,
        size_bytes=size,
        checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
        scenarios=states,
        loaders=names,
        loaders_explicit=explicit,
        repeats=args.repeats,
        skip_ceilings=args.skip_ceilings,
        keep=args.keep,
        seed=args.seed,
        shard_bytes=shard,
        time_budget_s=args.time_budget_s,
        verify=args.verify,
        worker_timeout_s=args.worker_timeout_s,
        python=args.python,
        tmpfs_dir=args.tmpfs_dir,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner's cleanup (tmpfs copy, files)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; the exit status."""
    from fastckpt.bench import report

    try:
        opts = _options(args)
    except ValueError as exc:
        print(f"fastckpt bench: error: {exc}", file=sys.stderr)
        return 2
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        if args.scenario != "load":
            states = [s for s in opts.scenarios if s in ("cold", "warm")] or ["warm"]
            return harness.run_scenario(
                args.scenario, args, size_bytes=opts.size_bytes, device=opts.device, states=states
            )
        what = opts.checkpoint or f"a generated {format_bytes(opts.size_bytes)} checkpoint"
        log(f"fastckpt bench: {what} -> {opts.device}; scenarios {', '.join(opts.scenarios)}")
        result = Runner(opts).run()
    except BenchError as exc:
        print(f"fastckpt bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    rows, paths = report.write_all(result.to_json(), opts.out_dir)
    print(report.table_markdown(rows))
    for note in result.notes:
        print(f"note: {note}")
    log(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    failed = False
    for r in rows:
        if r.bitwise != "FAIL" and r.ok_runs == r.runs:
            continue
        ours = r.loader in report.FASTCKPT_LOADERS
        failed = failed or ours
        print(
            f"fastckpt bench: {'FAILED' if ours else 'warning'} {r.loader}/{r.scenario}: "
            f"{r.error or 'bitwise mismatch'}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastckpt bench",
        description="Load a checkpoint with fastckpt and its peers in cold/warm/tmpfs scenarios, "
        "beside the hardware ceilings; check every result bitwise; write JSON, markdown, PNG.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
