"""Benchmark: a fresh process loading one checkpoint from the cache daemon vs the page cache vs
cold storage, on the same bytes.

    python -m fastckpt.serve.bench --size 2GiB --rounds 5 --dir /var/tmp/fastckpt-bench

Each round starts one fresh process per mode, in an order that rotates from round to round:

- ``daemon``: ``FASTCKPT_SERVER`` set; the daemon already holds the checkpoint (prefetched);
- ``warm``: no daemon; the partitions are in the page cache;
- ``cold``: no daemon; the partitions were dropped from the page cache just before
  (``posix_fadvise(DONTNEED)``; a VM's host may still cache the file, which this cannot see).

A child reports the load time (``fastckpt.load`` returning the tensors) and the time of a first
full touch (reading one byte of every page of every tensor), since a mapping defers page faults
until then. Medians and min–max of ``load_s`` and ``load_s + touch_s`` are reported, with the
machine's load average (other work on the machine changes the figures).

``run(...)`` returns the result as a dict. ``fastckpt bench --scenario daemon``
(``fastckpt/bench/scenario_daemon.py``) measures the same modes with ``serving`` and
``load_and_touch``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from fastckpt.serve.spawn import start_daemon, stop_daemon

MODES = ("daemon", "warm", "cold")


def make_checkpoint(path: str, nbytes: int) -> None:
    """A checkpoint of about ``nbytes`` (64 MiB float16 tensors of random values)."""
    import torch

    import fastckpt

    if os.path.exists(os.path.join(path, "fastckpt.index")):
        index = fastckpt.read_index(path)
        if abs(index.nbytes - nbytes) <= 64 << 20:
            return
    per = 64 << 20
    g = torch.Generator().manual_seed(0)
    sd = {
        f"layers.{i}.weight": torch.rand(per // 2 // 4096, 4096, generator=g).to(torch.float16)
        for i in range(max(1, nbytes // per))
    }
    fastckpt.save(sd, path, overwrite=True, progress=False)


def load_and_touch(mode: str, path: str, device: str = "cpu") -> dict[str, Any]:
    """One load in this process, as a fresh process does it: ``daemon`` asks the daemon that
    ``FASTCKPT_SERVER`` names (the very call ``fastckpt.load`` makes first; an error when it does
    not serve), other modes call ``fastckpt.load``. Then the first full touch (one byte of every
    page of every CPU tensor; a GPU load is synchronised instead)."""
    import torch

    import fastckpt
    from fastckpt.bench.worker import touch_pages
    from fastckpt.config import get_config
    from fastckpt.loader.api import load_via_server

    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    if mode == "daemon":
        served = load_via_server(path, device, stats=True)
        if served is None:
            raise SystemExit(f"the daemon at {get_config().server!r} did not serve {path}")
        tensors, stats = served
    else:
        tensors, stats = fastckpt.load(path, device, stats=True)
    if cuda:
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    check = 0 if cuda else touch_pages(tensors)
    t2 = time.perf_counter()
    return {
        "mode": mode,
        "load_s": t1 - t0,
        "touch_s": t2 - t1,
        "taken": stats.path_taken,
        "nbytes": stats.nbytes,
        "check": check,
    }


def _partitions(path: str) -> list[str]:
    from fastckpt.format.reader import read_index

    return [p.path for p in read_index(path).partitions]


def _spawn(mode: str, path: str, sock: str) -> dict[str, Any]:
    env = dict(os.environ, FASTCKPT_SERVER=sock if mode == "daemon" else "")
    if mode == "cold":
        from fastckpt.io_engine import drop_page_cache

        for p in _partitions(path):
            drop_page_cache(p)
    elif mode == "warm":
        for p in _partitions(path):  # make sure it is all in the page cache
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass
    out = subprocess.run(
        [sys.executable, "-m", "fastckpt.serve.bench", "--child", mode, path],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return row


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@contextlib.contextmanager
def serving(path: str, sock: str, budget_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """A ``fastckpt serve`` daemon on ``sock`` (its directory is created ``0700``) whose root is
    ``path``'s directory, with ``path`` prefetched; yields ``{"fill_s": ...}``, stops the daemon
    on exit. ``budget_bytes``: the DRAM budget (default: the checkpoint plus 64 MiB)."""
    from fastckpt.format.reader import read_index
    from fastckpt.serve.client import Client

    path = os.path.realpath(path)
    nbytes = sum(p.nbytes for p in read_index(path).partitions)
    budget = budget_bytes or nbytes + (64 << 20)
    daemon = start_daemon(
        sock,
        os.path.dirname(path),
        str(budget),
        ["--log-level", "warning"],
        env=dict(os.environ, FASTCKPT_SERVER=""),
    )
    try:
        t0 = time.perf_counter()
        with Client(sock, timeout_s=60) as c:
            c.prefetch(path)
        yield {"fill_s": time.perf_counter() - t0}
    finally:
        stop_daemon(daemon, 30)


def run(path: str, rounds: int = 5, budget_bytes: int | None = None) -> dict[str, Any]:
    """Start a daemon serving ``path``'s directory, prefetch, and time ``rounds`` rounds."""
    from fastckpt.config import get_config
    from fastckpt.format.reader import read_index
    from fastckpt.serve.client import Client

    if get_config().server:
        raise SystemExit("unset FASTCKPT_SERVER: the warm and cold loads must not use a daemon")
    path = os.path.realpath(path)
    nbytes = sum(p.nbytes for p in read_index(path).partitions)
    run_dir = tempfile.mkdtemp(prefix="fastckpt-serve-bench-")
    sock = os.path.join(run_dir, "run", "sock")
    try:
        with serving(path, sock, budget_bytes) as served:
            rows: list[dict[str, Any]] = []
            for r in range(rounds):
                order = MODES[r % 3 :] + MODES[: r % 3]
                for mode in order:
                    rows.append(_spawn(mode, path, sock))
            with Client(sock) as c:
                daemon_stats = c.stats()
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(sock))
            os.rmdir(run_dir)
    result: dict[str, Any] = {
        "checkpoint": path,
        "nbytes": nbytes,
        "rounds": rounds,
        "daemon_fill_s": served["fill_s"],
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "daemon_stats": daemon_stats,
        "modes": {},
    }
    for mode in MODES:
        mine = [x for x in rows if x["mode"] == mode]
        result["modes"][mode] = {
            "taken": sorted({x["taken"] for x in mine}),
            "load_s": _summary([x["load_s"] for x in mine]),
            "load_touch_s": _summary([x["load_s"] + x["touch_s"] for x in mine]),
        }
    return result


def _table(res: dict[str, Any]) -> str:
    gb = res["nbytes"] / 1e9
    lines = [
        f"checkpoint {res['checkpoint']} ({gb:.2f} GB), {res['rounds']} rounds, "
        f"{res['cpus']} CPUs, load average after {res['loadavg_after'][0]:.1f}; "
        f"daemon fill {res['daemon_fill_s']:.2f} s",
        "| mode | path | load s, median (min-max) | load + first touch s | GB/s (load+touch) |",
        "|---|---|---|---|---|",
    ]
    for mode, m in res["modes"].items():
        lo, lt = m["load_s"], m["load_touch_s"]
        lines.append(
            f"| {mode} | {'+'.join(m['taken'])} "
            f"| {lo['median']:.3f} ({lo['min']:.3f}-{lo['max']:.3f})"
            f" | {lt['median']:.3f} ({lt['min']:.3f}-{lt['max']:.3f}) | {gb / lt['median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastckpt.serve.bench", description=__doc__)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "fastckpt-serve-bench"))
    p.add_argument("--size", default="2GiB", help="checkpoint size to generate")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(load_and_touch(*args.child)))
        return 0
    from fastckpt.rules.units import size_arg as parse_size

    path = os.path.join(args.dir, "ckpt")
    os.makedirs(args.dir, exist_ok=True)
    make_checkpoint(path, parse_size(args.size))
    res = run(path, args.rounds)
    print(_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
