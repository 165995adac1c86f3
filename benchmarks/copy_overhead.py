"""What the C++ copy loop costs on its own, on a CPU machine.

The same warm file is read (a) by the engine straight into one buffer and (b) through
``run_copy_pipeline`` into staging slots, each slot then "copied" by a fake device. The fake
device is run three ways: ``null`` (copies nothing: what remains is the loop, the slot
bookkeeping and the reads into slots), ``memcpy`` (copies with memcpy on one thread per stream,
like a link as fast as this machine's memory) and ``checked`` (memcpy plus the two CRC32C passes
with which the tests catch a reused slot). Rounds alternate the methods; the table gives medians
and the spread (min-max) in GB/s (10^9 bytes per second), the median CPU time of the process (all
threads) per GB, and that of the calling thread, which runs the copy loop.

    python benchmarks/copy_overhead.py --size 1GiB --rounds 5
    python benchmarks/copy_overhead.py --size 4GiB --rounds 3 --cuda   # and through cuda:0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from fastckpt.io_engine import (
    AlignedBuffer,
    Engine,
    FakeCopyBackend,
    File,
    PinnedBuffer,
    SlotSource,
    cuda_copy_backend,
    run_copy_pipeline,
)
from fastckpt.rules.units import parse_size

MiB = 1 << 20


def make_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    block = np.random.default_rng(0).integers(0, 256, size=64 * MiB, dtype=np.uint8).tobytes()
    with open(path, "wb") as fh:
        left = size
        while left:
            left -= fh.write(block[: min(left, len(block))])


def cuda_pipeline(
    engine: Engine, f: File, size: int, slot: int, args: argparse.Namespace
) -> Callable[[], None] | None:
    """The same reads copied to cuda:0 on ``--streams`` torch streams, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        print("# --cuda: no CUDA device; skipped", file=sys.stderr)
        return None
    streams = [torch.cuda.Stream() for _ in range(args.streams)]
    backend = cuda_copy_backend(0, [s.cuda_stream for s in streams])
    slots = SlotSource(slot)
    slots.add(PinnedBuffer(backend, args.slots * slot, "register"))
    dst = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    ops = [
        ("read", f, off, min(slot, size - off), dst.data_ptr() + off, None)
        for off in range(0, size, slot)
    ]

    def run() -> None:
        run_copy_pipeline(engine, ops, slots, backend)
        torch.cuda.synchronize()

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slot", default="32MiB", help="staging slot size (and read size)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--cuda", action="store_true", help="also through cuda:0 (when available)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    slot = parse_size(args.slot)
    path = os.path.join(args.workdir, f"fastckpt-copy-overhead-{size}.bin")
    make_file(path, size)

    out = AlignedBuffer(size)
    np.frombuffer(memoryview(out), dtype=np.uint8)[:] = 1  # touched once: no page faults timed
    backends = {
        "null": FakeCopyBackend(args.streams, copy=False),
        "memcpy": FakeCopyBackend(args.streams, check=False),
        "checked": FakeCopyBackend(args.streams),
    }
    sources = {}
    for name, be in backends.items():
        sources[name] = SlotSource(slot)
        buf = PinnedBuffer(be, args.slots * slot)
        # Touched once, as pinning does on a real device: no first-touch page faults timed.
        np.frombuffer(memoryview(buf), dtype=np.uint8)[:] = 0
        sources[name].add(buf)
    engine = Engine()
    f = File(path, direct=False)
    base = np.frombuffer(memoryview(out), dtype=np.uint8).ctypes.data
    ops = [
        ("read", f, off, min(slot, size - off), base + off, None) for off in range(0, size, slot)
    ]

    def direct() -> None:
        engine.read([(f, 0, size, out, 0, 0)])

    def pipeline(name: str) -> Callable[[], None]:
        def run() -> None:
            run_copy_pipeline(engine, ops, sources[name], backends[name])

        return run

    methods: dict[str, Callable[[], None]] = {"engine -> one buffer": direct}
    for name in backends:
        methods[f"pipeline, fake device: {name}"] = pipeline(name)
    gpu = cuda_pipeline(engine, f, size, slot, args) if args.cuda else None
    if gpu is not None:
        methods["pipeline, cuda:0"] = gpu
    direct()  # warm the page cache
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    loop: dict[str, list[float]] = {m: [] for m in methods}  # the calling thread: the loop
    order = list(methods)
    for r in range(args.rounds):
        for m in order if r % 2 == 0 else reversed(order):
            c0, l0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            methods[m]()
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
            loop[m].append(time.thread_time() - l0)
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()},"
        f" Python {sys.version.split()[0]}; engine {engine.name} ({engine.info()['threads']} "
        f"threads); {size / 1e9:.2f} GB warm, slots {args.slots} x {slot // MiB} MiB, "
        f"{args.streams} streams, {args.rounds} rounds"
    )
    # CPU seconds (all threads of this process) per GB: what the work costs, however busy the
    # machine is; wall-clock rates on a shared VM swing with the neighbours.
    # The calling thread runs the copy loop: its CPU time is the loop's own cost.
    gb = size / 1e9
    print(
        f"{'method':36} {'median GB/s':>12} {'min-max GB/s':>14} {'CPU s/GB':>9}"
        f" {'loop CPU s/GB':>14}"
    )
    for m, ts in times.items():
        rates = [size / t / 1e9 for t in ts]
        print(
            f"{m:36} {statistics.median(rates):12.2f} {min(rates):6.2f}-{max(rates):<7.2f}"
            f" {statistics.median(cpu[m]) / gb:9.3f} {statistics.median(loop[m]) / gb:14.4f}"
        )
    engine.close()
    f.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
