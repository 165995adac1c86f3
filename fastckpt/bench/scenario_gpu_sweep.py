"""Scenario ``gpu-sweep``: the loader's pipeline settings, one checkpoint, warm page cache.

Each configuration runs in its own fresh process with its settings in that process's
environment (``FASTCKPT_RING_SLOT_BYTES``, ``FASTCKPT_RING_BYTES``, ``FASTCKPT_PIN_METHOD``,
``FASTCKPT_COPY_STREAMS``, ``FASTCKPT_CHUNK_BYTES``, ...): the first load (what a fresh process
pays, ring creation included) is the row's time; ``extra`` has the median of
``--sweep-repeats`` further loads in the same process (ring reused), the ring's slots and pinning
method, and the path taken. The checkpoint is ``--checkpoint`` (a fastckpt or safetensors
folder) or a generated one of ``--size``. On a CPU device the sweep covers the CPU settings
(chunk size, pread threads, page-cache mapping), so the scenario also runs without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from fastckpt.bench.harness import Context, Measurement, scratch
from fastckpt.rules.units import MiB

HELP = (
    "sweep the loader's pipeline settings (ring, slots, pinning, streams, chunk) on one checkpoint"
)
BASELINES = {"gpu-sweep": "defaults"}

GPU_CONFIGS: list[dict[str, Any]] = [
    {},
    {"ring_slot_bytes": 32 * MiB, "ring_bytes": 512 * MiB, "pin_method": "register"},
    {"ring_slot_bytes": 32 * MiB, "ring_bytes": 512 * MiB, "pin_method": "alloc"},
    {"ring_slot_bytes": 16 * MiB, "ring_bytes": 256 * MiB, "pin_method": "register"},
    {"ring_slot_bytes": 8 * MiB, "ring_bytes": 128 * MiB, "pin_method": "register"},
    {"ring_slot_bytes": 64 * MiB, "ring_bytes": 1024 * MiB, "pin_method": "register"},
    {"ring_slot_bytes": 16 * MiB, "ring_bytes": 256 * MiB, "copy_streams": 2},
    {"ring_slot_bytes": 16 * MiB, "ring_bytes": 256 * MiB, "chunk_bytes": 1 * MiB},
    {"ring_slot_bytes": 16 * MiB, "ring_bytes": 256 * MiB, "chunk_bytes": 8 * MiB},
]
CPU_CONFIGS: list[dict[str, Any]] = [
    {},
    {"cpu_map_cached": 0},
    {"cpu_map_cached": 0, "chunk_bytes": 1 * MiB},
    {"cpu_map_cached": 0, "chunk_bytes": 16 * MiB},
    {"cpu_map_cached": 0, "io_threads": 1},
]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sweep-repeats", type=int, default=2, help="gpu-sweep: loads after the first"
    )


def label(config: dict[str, Any]) -> str:
    if not config:
        return "defaults"
    return " ".join(
        f"{k}={v // MiB}MiB" if k.endswith("bytes") else f"{k}={v}" for k, v in config.items()
    )


def _checkpoint(ctx: Context) -> str:
    given = ctx.option("checkpoint")
    if given:
        return os.path.abspath(given)
    import fastckpt
    from fastckpt.bench.scenario_convert_memory import generate_safetensors

    src = scratch(ctx, "src")
    generate_safetensors(src, ctx.size_bytes, max(4096, min(64 * MiB, ctx.size_bytes // 16)), 2)
    dst = os.path.join(ctx.workdir, "fck")
    fastckpt.convert(src, dst, overwrite=True, progress=False)
    return dst


def plan(ctx: Context) -> list[Measurement]:
    path = _checkpoint(ctx)
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    configs = GPU_CONFIGS if ctx.device.startswith("cuda") else CPU_CONFIGS
    repeats = max(0, int(ctx.option("sweep_repeats", 2)))
    out = []
    for config in configs:
        env = {f"FASTCKPT_{k.upper()}": str(v) for k, v in config.items()}
        spec = {"path": path, "repeats": repeats, "config": config}
        out.append(Measurement(label(config), spec, state="warm", files=files, env=env))
    return out


def describe(ctx: Context) -> dict[str, Any]:
    return {"checkpoint": ctx.option("checkpoint"), "sweep_repeats": ctx.option("sweep_repeats")}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import fastckpt
    from fastckpt.loader.api import peek_default

    device = spec["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.empty(1, device=device)  # the CUDA context is not the loader's cost

    def once() -> tuple[float, Any]:
        t0 = time.perf_counter()
        tensors, stats = fastckpt.load(spec["path"], device, stats=True)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        del tensors
        return seconds, stats

    first, stats = once()
    again = [once()[0] for _ in range(spec["repeats"])]
    default = peek_default()
    ring = None if default is None else default.current_ring
    extra = {
        "median_repeat_s": statistics.median(again) if again else None,
        "path": stats.path_taken,
        "slots": ring.total if ring is not None else 0,
        "pin_method": ring.method if ring is not None else None,
        "notes": list(stats.notes),
    }
    return {"seconds": first, "nbytes": stats.nbytes, "extra": extra}
