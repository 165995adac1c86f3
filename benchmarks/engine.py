"""Sequential read throughput of the I/O engine, beside fio on the same file in the same run.

Cold runs drop the file from the page cache before every read (fsync + posix_fadvise DONTNEED;
no root needed). Configurations are interleaved within each repeat, and the table shows the
median and the spread (min..max) of the repeats, because shared or virtual disks are noisy.

    python benchmarks/engine.py                      # 2 GiB file in /tmp, cold + warm
    python benchmarks/engine.py --size 512M --repeats 5 --dir /mnt/nvme
    python benchmarks/engine.py --json out.json

Rows: ``direct`` reads go through O_DIRECT (``File(direct=True)``), ``buffered`` through the page
cache. ``auto`` is what ``Engine()`` picks with the configured defaults. fio rows are the
ceiling: O_DIRECT with io_uring at the same block sizes and depths, and a buffered psync read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastckpt.config import get_config
from fastckpt.io_engine import (
    AlignedBuffer,
    Engine,
    File,
    drop_page_cache,
    engine_info,
)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'2G' -> 2 GiB, '512M', '4096'."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    value = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def fmt_size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass
class Case:
    """One configuration to time; `run` reads the whole file once and returns bytes read."""

    label: str
    mode: str  # "direct" | "buffered"
    run: Callable[[], int]
    samples: list[float] = field(default_factory=list)  # GB/s


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "engine": engine_info(),
    }


def fs_type(path: str) -> str:
    for cmd in (
        ["findmnt", "-n", "-o", "FSTYPE", "--target", path],
        ["stat", "-f", "-c", "%T", path],
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
    return "?"


def make_file(path: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())


def engine_case(
    label: str,
    path: str,
    size: int,
    buf: AlignedBuffer,
    *,
    direct: bool,
    kind: str | None = None,
    queue_depth: int | None = None,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    buffered_route: str = "default",
) -> Case:
    def run() -> int:
        with (
            Engine(
                kind,
                queue_depth=queue_depth,
                threads=threads,
                chunk_bytes=chunk_bytes,
                _buffered_route=buffered_route,
            ) as engine,
            File(path, direct=direct) as f,
        ):
            engine.read([(f, 0, size, buf, 0, 0)])
        return size

    return Case(label, "direct" if direct else "buffered", run)


def fio_case(
    label: str, path: str, size: int, *, direct: bool, bs: int, depth: int, fixed: bool = False
) -> Case:
    engine = "io_uring" if direct else "psync"
    cmd = [
        "fio",
        "--name=seq",
        f"--filename={path}",
        "--rw=read",
        f"--bs={bs}",
        f"--size={size}",
        f"--direct={1 if direct else 0}",
        f"--ioengine={engine}",
        "--invalidate=0",  # the harness drops (cold) or fills (warm) the cache itself
        # fio's default buffers are not page-aligned, which makes page-cache copies several
        # times slower on some machines: align them, as ours are.
        "--iomem_align=2m",
        "--output-format=json",
    ]
    if direct:
        cmd.append(f"--iodepth={depth}")
    if fixed:
        # Pre-registered buffers and files: no page pinning per I/O (fio's best case).
        cmd += ["--fixedbufs", "--registerfiles"]

    def run() -> int:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        job = json.loads(out.stdout)["jobs"][0]["read"]
        # fio's own timing excludes its start-up; report its figure, converted to bytes read.
        run.last_gbps = job["bw_bytes"] / 1e9  # type: ignore[attr-defined]
        return int(job["io_bytes"])

    run.last_gbps = 0.0  # type: ignore[attr-defined]
    case = Case(label, "direct" if direct else "buffered", run)
    case.fio = True  # type: ignore[attr-defined]
    return case


def time_case(case: Case, path: str, cold: bool) -> None:
    if cold:
        drop_page_cache(path)
    else:
        warm_up(path)
    t0 = time.perf_counter()
    nbytes = case.run()
    dt = time.perf_counter() - t0
    if getattr(case, "fio", False):
        case.samples.append(case.run.last_gbps)  # type: ignore[attr-defined]
    else:
        case.samples.append(nbytes / dt / 1e9)


def warm_up(path: str) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        while fh.readinto(buf):
            pass


def build_cases(
    args: argparse.Namespace, path: str, size: int, buf: AlignedBuffer, cold: bool
) -> list[Case]:
    cfg = get_config()
    cases: list[Case] = []
    has_fio = shutil.which("fio") is not None and not args.no_fio
    uring = engine_info("auto")["uring_usable"]
    threads = cfg.resolved_io_threads()
    chunk = cfg.chunk_bytes
    if cold:
        cases.append(engine_case("auto (defaults)", path, size, buf, direct=True))
        for qd in args.queue_depths:
            for bs in args.chunks:
                name = f"qd={qd} chunk={fmt_size(bs)}"
                if uring:
                    cases.append(
                        engine_case(
                            f"io_uring {name}",
                            path,
                            size,
                            buf,
                            direct=True,
                            kind="uring",
                            queue_depth=qd,
                            chunk_bytes=bs,
                        )
                    )
                if has_fio:
                    for fixed in (False, True):
                        cases.append(
                            fio_case(
                                f"fio io_uring {name}{' fixedbufs' if fixed else ''}",
                                path,
                                size,
                                direct=True,
                                bs=bs,
                                depth=qd,
                                fixed=fixed,
                            )
                        )
        for qd in args.queue_depths:
            cases.append(
                engine_case(
                    f"pread qd={qd} chunk={fmt_size(chunk)}",
                    path,
                    size,
                    buf,
                    direct=True,
                    kind="pread",
                    queue_depth=qd,
                    chunk_bytes=chunk,
                )
            )
    cases.append(engine_case("auto buffered (defaults)", path, size, buf, direct=False))
    for n in sorted({threads, *args.threads}):
        cases.append(
            engine_case(
                f"buffered pread pool threads={n}",
                path,
                size,
                buf,
                direct=False,
                kind="pread",
                threads=n,
                chunk_bytes=chunk,
            )
        )
    if uring:
        for qd in sorted({cfg.queue_depth, *args.queue_depths}):
            cases.append(
                engine_case(
                    f"buffered io_uring qd={qd}",
                    path,
                    size,
                    buf,
                    direct=False,
                    kind="uring",
                    queue_depth=qd,
                    chunk_bytes=chunk,
                )
            )
    if has_fio:
        cases.append(
            fio_case("fio buffered psync bs=1M", path, size, direct=False, bs=1 << 20, depth=1)
        )
    return cases  # fmt: skip


def run_scenario(
    args: argparse.Namespace, path: str, size: int, buf: AlignedBuffer, cold: bool
) -> list[Case]:
    cases = build_cases(args, path, size, buf, cold)
    for rep in range(args.repeats):
        order = cases if rep % 2 == 0 else list(reversed(cases))  # interleave, alternate order
        for case in order:
            time_case(case, path, cold)
    return cases


def report(title: str, cases: Sequence[Case]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fio_best = {
        mode: max(
            (
                statistics.median(c.samples)
                for c in cases
                if getattr(c, "fio", False) and c.mode == mode
            ),
            default=0.0,
        )
        for mode in ("direct", "buffered")
    }
    print(f"\n== {title} ==")
    print(f"{'configuration':<36} {'mode':<9} {'GB/s':>7} {'spread':>15} {'vs best fio':>12}")
    for c in cases:
        med = statistics.median(c.samples)
        lo, hi = min(c.samples), max(c.samples)
        ref = fio_best[c.mode]
        ratio = f"{100 * med / ref:.0f}%" if ref > 0 else "-"
        print(f"{c.label:<36} {c.mode:<9} {med:7.2f} {lo:7.2f}..{hi:<6.2f} {ratio:>12}")
        rows.append(
            {
                "label": c.label,
                "mode": c.mode,
                "median_gbps": med,
                "samples_gbps": c.samples,
                "fio": bool(getattr(c, "fio", False)),
                "vs_fio_best": med / ref if ref else None,
            }
        )
    for mode in ("direct", "buffered"):
        ours = [r for r in rows if r["mode"] == mode and not r["fio"]]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["median_gbps"])
        auto = next((r for r in ours if r["label"].startswith("auto")), None)
        line = f"{mode}: best engine configuration {best['label']!r} {best['median_gbps']:.2f} GB/s"
        if auto is not None:
            line += f"; auto {auto['median_gbps']:.2f} GB/s"
        if fio_best[mode] > 0:
            line += f"; best fio {fio_best[mode]:.2f} GB/s"
            if auto is not None:
                line += f" (auto = {100 * auto['median_gbps'] / fio_best[mode]:.0f}% of it)"
        print(line)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=parse_size, default=2 << 30, help="file size (default 2G)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="directory for the test file")
    p.add_argument("--file", help="use this existing file instead of creating one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--queue-depths", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64]
    )
    p.add_argument(
        "--chunks",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default=[1 << 20, 4 << 20, 16 << 20],
    )
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[8])
    p.add_argument("--no-fio", action="store_true", help="skip fio")
    p.add_argument("--no-warm", action="store_true", help="skip the warm (page-cached) runs")
    p.add_argument("--no-cold", action="store_true", help="skip the cold runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    info = machine()
    created = args.file is None
    path = args.file or os.path.join(args.dir, f"fastckpt-bench-{os.getpid()}.bin")
    results: dict[str, Any] = {"machine": info}
    try:
        if created:
            make_file(path, args.size)
        size = os.path.getsize(path)
        results["file"] = {"path": path, "nbytes": size, "fs": fs_type(path)}
        print(f"fastckpt engine benchmark: {fmt_size(size)} file on {fs_type(path)} ({path})")
        print(f"machine: {info['cpus']} CPUs, {info['ram_gib']} GiB RAM, Linux {info['kernel']}")
        print(f"auto engine: {info['engine']['name']} ({info['engine']['reason']})")
        buf = AlignedBuffer(size)
        memoryview(buf)[:] = bytes(size)  # fault the pages in now, not in the first timed read
        if not args.no_cold:
            cases = run_scenario(args, path, size, buf, cold=True)
            results["cold"] = report(f"cold (page cache dropped), {args.repeats} repeats", cases)
        if not args.no_warm:
            cases = run_scenario(args, path, size, buf, cold=False)
            results["warm"] = report(f"warm (page-cached), {args.repeats} repeats", cases)
    finally:
        if created and os.path.exists(path):
            os.unlink(path)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
