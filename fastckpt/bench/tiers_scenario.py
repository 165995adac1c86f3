"""Benchmark scenarios ``dram-tier`` and ``gpu-tier``: a long-lived Loader's tiers beside cold and
warm page-cache loads of the same checkpoint, in one process.

Unlike the fresh-process scenarios, a tier hit only exists inside a process that loaded the
checkpoint before, so each scenario runs its variants in one process and alternates their order
between rounds. Each variant reports the load (the call to ``Loader.load``) and, for CPU loads,
the first full touch of every page of every tensor (mapped loads fault pages in on first touch,
so load + touch is the honest comparison).

- ``dram-tier``: ``cold`` (files dropped from the page cache), ``warm`` (files in the page cache,
  mapped), ``warm-copy`` (page cache, copied: ``cpu_map_cached=False``), ``dram-tier`` (a hit of
  the DRAM tier: copy-on-write mapping of its memfds). Also the read-mode probe's figures.
- ``gpu-tier`` (needs CUDA): ``warm`` (page cache -> staging ring -> GPU), ``dram-tier`` (pinned
  DRAM tier -> GPU), ``gpu-tier`` (buffers revived from the GPU tier).

Run: ``python -m fastckpt.bench.tiers_scenario dram-tier CHECKPOINT [--repeats N] [--json F]``;
``--generate BYTES`` first writes a synthetic checkpoint of that size to CHECKPOINT.
``SCENARIOS[name](path, repeats=N)`` returns a JSON-able dict (``rows``: variant -> stats).
``fastckpt bench --scenario dram-tier|gpu-tier`` (``scenario_tiers.py``) measures the same
variants (``loader_settings``, ``timed_load``), each in a fresh process of its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def drop(path: str) -> None:
    """Drop the checkpoint's files from the page cache."""
    import fastckpt
    from fastckpt import io_engine

    for p in fastckpt.read_index(path).partitions:
        io_engine.drop_page_cache(p.path)


def _warm(path: str) -> None:
    import fastckpt

    for p in fastckpt.read_index(path).partitions:
        with open(p.path, "rb") as f:
            while f.read(64 << 20):
                pass


def loader_settings(variant: str, nbytes: int) -> dict[str, Any]:
    """``fastckpt.Loader`` keyword arguments of a variant: ``plain`` (no tier), ``copy`` (no tier,
    page cache copied, not mapped), ``dram-tier`` or ``gpu-tier`` (room for the checkpoint)."""
    no_tier: dict[str, Any] = {"dram_tier_bytes": 0, "gpu_tier_bytes": 0}
    settings: dict[str, dict[str, Any]] = {
        "plain": no_tier,
        "copy": {**no_tier, "cpu_map_cached": False},
        "dram-tier": {"dram_tier_bytes": nbytes + (1 << 20), "gpu_tier_bytes": 0},
        "gpu-tier": {"gpu_tier_bytes": 2 * nbytes},
    }
    return settings[variant]


def timed_load(loader: Any, path: str, device: str = "cpu") -> tuple[float, float, str]:
    """One load by ``loader``: (load seconds, first-touch seconds, path taken). Done means
    usable: a CPU result has every page touched once (mapped pages fault in on first touch), a
    GPU load is synchronised."""
    from fastckpt.bench.worker import touch_pages

    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    tensors, stats = loader.load(path, device, stats=True)
    if cuda:
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    if not cuda:
        touch_pages(tensors)
    t2 = time.perf_counter()
    del tensors
    gc.collect()
    return t1 - t0, t2 - t1, str(stats.path_taken)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _machine() -> dict[str, Any]:
    shmem_thp = ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled", encoding="ascii") as f:
            shmem_thp = f.read().strip()
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load_avg": os.getloadavg(),
        "python": sys.version.split()[0],
        # the DRAM tier's memfd pages are 4 KiB unless shmem huge pages are allowed
        "shmem_thp": shmem_thp,
    }


def run_dram_tier(path: str, *, repeats: int = 5) -> dict[str, Any]:
    import fastckpt
    from fastckpt.loader import profile

    path = os.fspath(path)
    nbytes = sum(p.nbytes for p in fastckpt.read_index(path).partitions)
    plain = fastckpt.Loader(**loader_settings("plain", nbytes))
    copying = fastckpt.Loader(**loader_settings("copy", nbytes))
    tiered = fastckpt.Loader(**loader_settings("dram-tier", nbytes))
    largest = max(fastckpt.read_index(path).partitions, key=lambda p: p.nbytes).path
    probe = profile.probe(largest, plain.engine(), force=True)
    _warm(path)
    t0 = time.perf_counter()
    tiered.load(path)  # fills the DRAM tier
    fill_s = time.perf_counter() - t0
    gc.collect()

    def variant(name: str) -> tuple[float, float, str]:
        if name == "cold":
            # a DRAM-tier item may keep the file's page cache locked: release it to go cold
            tiered.evict(path)
            drop(path)
            loader = plain
        elif name == "warm":
            _warm(path)
            loader = plain
        elif name == "warm-copy":
            _warm(path)
            loader = copying
        else:
            loader = tiered
            if tiered.dram_tier.used_bytes == 0:  # a cold round evicted it: refill, not timed
                tiered.load(path)
                gc.collect()
        return timed_load(loader, path)

    names = ["cold", "warm", "warm-copy", "dram-tier"]
    samples: dict[str, dict[str, list[float]]] = {
        n: {"load_s": [], "touch_s": [], "total_s": []} for n in names
    }
    paths: dict[str, str] = {}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            load_s, touch_s, taken = variant(n)
            samples[n]["load_s"].append(load_s)
            samples[n]["touch_s"].append(touch_s)
            samples[n]["total_s"].append(load_s + touch_s)
            paths[n] = taken
    rows = {
        n: {
            **{k: _summary(v) for k, v in s.items()},
            "gbps_total": nbytes / statistics.median(s["total_s"]) / 1e9,
            "path_taken": paths[n],
        }
        for n, s in samples.items()
    }
    info = tiered.cache_info()["dram"]
    for loader in (plain, copying, tiered):
        loader.close()
    return {
        "scenario": "dram-tier",
        "checkpoint": path,
        "nbytes": nbytes,
        "repeats": repeats,
        "dram_fill_s": fill_s,
        "rows": rows,
        "dram_tier": {
            k: info.get(k) for k in ("hits", "misses", "used_bytes", "held_items", "lock_failures")
        },
        "read_probe": probe.as_dict() if probe is not None else None,
        "machine": _machine(),
    }


def run_gpu_tier(path: str, *, repeats: int = 5, device: str = "cuda:0") -> dict[str, Any]:
    import torch

    import fastckpt

    if not torch.cuda.is_available():
        return {"scenario": "gpu-tier", "skipped": "CUDA is not available"}
    path = os.fspath(path)
    nbytes = sum(p.nbytes for p in fastckpt.read_index(path).partitions)
    plain = fastckpt.Loader(**loader_settings("plain", nbytes))
    dram = fastckpt.Loader(**loader_settings("dram-tier", nbytes))
    gpu = fastckpt.Loader(**loader_settings("gpu-tier", nbytes))
    _warm(path)
    for loader in (plain, dram, gpu):  # first loads: pin the ring, fill the tiers
        t = loader.load(path, device)
        del t
    dram.prefetch(path, tier="dram", device=device).result()  # the item's background pinning
    gc.collect()
    names = {"warm": plain, "dram-tier": dram, "gpu-tier": gpu}
    samples: dict[str, list[float]] = {n: [] for n in names}
    paths: dict[str, str] = {}
    for r in range(repeats):
        order = list(names) if r % 2 == 0 else list(names)[::-1]
        for n in order:
            load_s, _, paths[n] = timed_load(names[n], path, device)
            samples[n].append(load_s)
    rows = {
        n: {
            "load_s": _summary(v),
            "gbps": nbytes / statistics.median(v) / 1e9,
            "path_taken": paths[n],
        }
        for n, v in samples.items()
    }
    for loader in names.values():
        loader.close()
    return {
        "scenario": "gpu-tier",
        "checkpoint": path,
        "nbytes": nbytes,
        "repeats": repeats,
        "rows": rows,
        "device": torch.cuda.get_device_name(device),
        "machine": _machine(),
    }


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "dram-tier": run_dram_tier,
    "gpu-tier": run_gpu_tier,
}


def generate(path: str, nbytes: int, *, tensor_bytes: int = 64 << 20) -> None:
    """A synthetic checkpoint of about ``nbytes`` (bf16 tensors of ``tensor_bytes``)."""
    import torch

    import fastckpt

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(max(1, nbytes // tensor_bytes)):
        sd[f"layers.{i}.weight"] = torch.randn(tensor_bytes // 2, generator=g).to(torch.bfloat16)
    fastckpt.save(sd, path, metadata=None)


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"{result['scenario']}: skipped ({result['skipped']})"
    gb = result["nbytes"] / 1e9
    lines = [f"### {result['scenario']}: {gb:.2f} GB, {result['repeats']} rounds"]
    if result["scenario"] == "dram-tier":
        lines += [
            "| variant | load ms (median, min-max) | first touch ms | load+touch ms | GB/s"
            " | path |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in result["rows"].items():
            lo, to, tt = r["load_s"], r["touch_s"], r["total_s"]
            lines.append(
                f"| {n} | {lo['median'] * 1e3:.1f} ({lo['min'] * 1e3:.1f}-{lo['max'] * 1e3:.1f})"
                f" | {to['median'] * 1e3:.1f} | {tt['median'] * 1e3:.1f}"
                f" ({tt['min'] * 1e3:.1f}-{tt['max'] * 1e3:.1f}) | {r['gbps_total']:.2f}"
                f" | {r['path_taken']} |"
            )
        p = result.get("read_probe")
        if p:
            lines.append(
                f"\nread-mode probe ({p['key']}, {p['probe_bytes'] >> 20} MiB cold): O_DIRECT "
                f"{p['direct_gbps']} GB/s, buffered {p['buffered_gbps']} GB/s, mixed "
                f"{p['mixed_gbps']} GB/s -> {p['best']}"
            )
        lines.append(f"DRAM tier fill (first load): {result['dram_fill_s'] * 1e3:.0f} ms")
        d = result["dram_tier"]
        lines.append(
            f"DRAM tier items holding page cache: {d.get('held_items')}, "
            f"copied after a failed lock: {d.get('lock_failures')}"
        )
    else:
        lines += ["| variant | load ms (median, min-max) | GB/s | path |", "|---|---|---|---|"]
        for n, r in result["rows"].items():
            lo = r["load_s"]
            lines.append(
                f"| {n} | {lo['median'] * 1e3:.1f} ({lo['min'] * 1e3:.1f}-{lo['max'] * 1e3:.1f})"
                f" | {r['gbps']:.2f} | {r['path_taken']} |"
            )
    lines.append(f"machine: {result['machine']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastckpt.bench.tiers_scenario")
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("checkpoint")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--generate", type=int, default=0, help="write a checkpoint of BYTES first")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    args = ap.parse_args(argv)
    if args.generate and not os.path.exists(args.checkpoint):
        generate(args.checkpoint, args.generate)
    result = SCENARIOS[args.scenario](args.checkpoint, repeats=args.repeats)
    print(markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
