"""Scenario ``engine``: sequential read throughput of the I/O engine, beside fio.

One file of ``--size`` random bytes in the workdir. ``cold`` rows read it with O_DIRECT after
it is dropped from the page cache (the engine's defaults, io_uring and the pread pool at each
``--engine-queue-depths``, fio io_uring at the same depths); ``warm`` rows read it through the
page cache (defaults, the pread pool at ``--engine-threads``, io_uring, fio psync). fio rows are
the ceiling; fio reports its own time (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from typing import Any

from fastckpt.bench.harness import Context, Measurement
from fastckpt.rules.units import MiB

HELP = "I/O engine read throughput (io_uring, pread pool, O_DIRECT, buffered) beside fio"
BASELINES: dict[str, str] = {}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--engine-queue-depths", default="32", help="engine: comma-separated (default 32)"
    )
    group.add_argument(
        "--engine-threads", default="", help="engine: pread pool sizes (default: the config's)"
    )
    group.add_argument("--no-fio", action="store_true", help="engine: do not run fio")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _make_file(path: str, size: int) -> None:
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            left -= fh.write(block[: min(left, len(block))])
        fh.flush()
        os.fsync(fh.fileno())


def plan(ctx: Context) -> list[Measurement]:
    from fastckpt.config import get_config
    from fastckpt.io_engine import engine_info

    size = max(4096, ctx.size_bytes - ctx.size_bytes % 4096)
    path = os.path.join(ctx.workdir, "engine.bin")
    _make_file(path, size)
    cfg = get_config()
    uring = bool(engine_info("auto").get("uring_usable"))
    fio = not ctx.option("no_fio") and shutil.which("fio") is not None
    depths = _ints(ctx.option("engine_queue_depths", "32")) or [cfg.queue_depth]
    threads = _ints(ctx.option("engine_threads", "")) or [cfg.resolved_io_threads()]
    base = {"path": path, "size": size}
    out: list[Measurement] = []

    def add(state: str, method: str, **spec: Any) -> None:
        out.append(Measurement(method, {**base, **spec}, state=state, files=(path,)))

    if "cold" in ctx.states:
        add("cold", "auto direct (defaults)", direct=True)
        for qd in depths:
            if uring:
                add("cold", f"io_uring direct qd={qd}", direct=True, kind="uring", queue_depth=qd)
            add("cold", f"pread direct qd={qd}", direct=True, kind="pread", queue_depth=qd)
            if fio:
                add("cold", f"fio io_uring direct qd={qd}", tool="fio", direct=True, depth=qd)
    if "warm" in ctx.states:
        add("warm", "auto buffered (defaults)", direct=False)
        for n in threads:
            add("warm", f"pread buffered threads={n}", direct=False, kind="pread", threads=n)
        if uring:
            add("warm", "io_uring buffered", direct=False, kind="uring")
        if fio:
            add("warm", "fio psync buffered bs=1M", tool="fio", direct=False, depth=1)
    return out


def describe(ctx: Context) -> dict[str, Any]:
    return {"file_bytes": ctx.size_bytes}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("tool") == "fio":
        return _fio(spec)
    from fastckpt.io_engine import AlignedBuffer, Engine, File

    buf = AlignedBuffer(spec["size"])
    with (
        Engine(
            spec.get("kind"), queue_depth=spec.get("queue_depth"), threads=spec.get("threads")
        ) as engine,
        File(spec["path"], direct=spec["direct"]) as f,
    ):
        t0 = time.perf_counter()
        engine.read([(f, 0, spec["size"], buf, 0, 0)])
        seconds = time.perf_counter() - t0
        name = engine.name
    return {"seconds": seconds, "nbytes": spec["size"], "extra": {"engine": name}}


def _fio(spec: dict[str, Any]) -> dict[str, Any]:
    direct = bool(spec["direct"])
    cmd = [
        "fio",
        "--name=seq",
        f"--filename={spec['path']}",
        "--rw=read",
        f"--bs={4 * MiB if direct else MiB}",
        f"--size={spec['size']}",
        f"--direct={1 if direct else 0}",
        f"--ioengine={'io_uring' if direct else 'psync'}",
        f"--iodepth={spec['depth']}",
        "--invalidate=0",  # the harness set the cache state
        "--iomem_align=2m",  # page-aligned buffers, as the engine's
        "--output-format=json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(proc.stdout)["jobs"][0]["read"]
    nbytes = int(job["io_bytes"])
    return {"seconds": nbytes / float(job["bw_bytes"]), "nbytes": nbytes, "extra": {"fio": True}}
