"""The child process of the harness: ``python -m fastckpt.bench.worker MODE --result FILE ...``.

Modes:

- ``probe``: the machine as this interpreter sees it (torch, CUDA, GPU) and which loaders import.
- ``generate``: probe (refusing a device the machine lacks), then generate or adopt the checkpoint
  (``fastckpt.bench.generate``), then the reference fingerprints: ``safetensors.torch.load_file``
  on CPU, CRC32C per tensor.
- ``load``: one measurement of one loader. Imports and CUDA context creation happen first, outside
  the clock; the clock runs from just before the loader's first call until every tensor is
  usable: ``torch.cuda.synchronize()`` for a GPU target; for a CPU target one byte of every page
  of every tensor is read (so a lazy, memory-mapped result pays for its reads). Then, outside the
  clock: peak host RSS (``VmHWM``, reset just before the call), peak device memory, and with
  ``--fingerprint`` a CRC32C of every tensor's bytes for the parent's bitwise check.
- ``ceilings``: page cache -> host memory (pinned when a GPU is the target) with several threads,
  and pinned host -> GPU in 64 MB chunks on 4 CUDA streams.

The result is one JSON object written to ``--result`` (atomically); the exit status is 0 when
the measurement succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastckpt.bench import loaders
from fastckpt.bench.common import chunk_tasks, parallel_pread
from fastckpt.rules.units import MiB


def status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _crc_function() -> tuple[str, Any]:
    try:
        from fastckpt import io_engine

        return "crc32c", io_engine.crc32c
    except ImportError:
        import zlib

        return "crc32", zlib.crc32


def fingerprint(tensors: dict[str, Any]) -> tuple[str, dict[str, list[Any]]]:
    """``(algorithm, {name: [dtype, shape, nbytes, crc]})`` over each tensor's bytes on CPU."""
    import torch

    algo, crc = _crc_function()

    def one(item: tuple[str, Any]) -> tuple[str, list[Any]]:
        name, t = item
        c = t.detach()
        if c.device.type != "cpu":
            c = c.cpu()
        if not c.is_contiguous():
            c = c.contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = list(t.shape)
        if c.numel() == 0:
            return name, [dtype, shape, 0, 0]
        flat = c.reshape(-1).view(torch.uint8)
        return name, [dtype, shape, int(flat.numel()), int(crc(flat.numpy()))]

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        out = dict(pool.map(one, tensors.items()))
    return algo, out


def touch_pages(tensors: dict[str, Any]) -> int:
    """Read one byte of every page of every CPU tensor (plus its last byte)."""
    import torch

    acc = 0
    for t in tensors.values():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        c = t if t.is_contiguous() else t.contiguous()
        flat = c.reshape(-1).view(torch.uint8)
        acc += int(flat[::4096].sum(dtype=torch.int64)) + int(flat[-1])
    return acc


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def _probe(device: str) -> dict[str, Any]:
    import torch

    cuda = bool(torch.cuda.is_available())
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": getattr(torch.version, "cuda", None),
        "cuda_available": cuda,
        "torch_threads": torch.get_num_threads(),
        "crc": _crc_function()[0],
    }
    if cuda:
        idx = (torch.device(device).index or 0) if device.startswith("cuda") else 0
        idx = min(idx, torch.cuda.device_count() - 1)
        props = torch.cuda.get_device_properties(idx)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_name"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
    try:
        import fastckpt

        info["fastckpt"] = fastckpt.__version__
        info["engine_info"] = _jsonable(fastckpt.engine_info())
    except Exception as exc:
        info["engine_info"] = f"unavailable: {type(exc).__name__}: {exc}"
    info["loaders"] = {name: loaders.availability(name, cuda=cuda) for name in loaders.LOADERS}
    return info


def check_device(probe: dict[str, Any], device: str) -> None:
    """Raise ValueError when ``device`` (cpu, cuda, cuda:N) is not usable per ``probe``."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"device {device!r}: expected cpu or cuda:N")
    if not probe.get("cuda_available"):
        raise ValueError(f"device {device}: torch {probe.get('torch')} sees no CUDA device here")
    idx = int(device.split(":", 1)[1]) if ":" in device else 0
    if idx >= int(probe.get("gpu_count", 0)):
        raise ValueError(f"device {device}: only {probe.get('gpu_count')} CUDA device(s) visible")


def _load(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    with open(args.ckpt, encoding="utf-8") as fh:
        ckpt = json.load(fh)
    device = args.device
    cuda = device.startswith("cuda")
    free0 = 0
    if cuda:
        torch.cuda.set_device(torch.device(device))
        torch.empty(1, device=device)  # context creation is not part of any load
        torch.cuda.synchronize()
        free0, _ = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()
    loaders.prepare(args.loader)
    gc.collect()
    rss_before = status_bytes("VmRSS") or 0
    hwm_reset = _reset_peak_rss()

    t0 = time.perf_counter()
    loaded = loaders.load(args.loader, ckpt, device)
    if cuda:
        torch.cuda.synchronize()
    else:
        touch_pages(loaded.tensors)
    seconds = time.perf_counter() - t0

    result: dict[str, Any] = {
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": status_bytes("VmHWM"),
        "peak_rss_is_reset": hwm_reset,
        "tensors": len(loaded.tensors),
        "nbytes": int(sum(t.numel() * t.element_size() for t in loaded.tensors.values())),
        "devices": sorted({str(t.device) for t in loaded.tensors.values()}),
        "extra": loaded.extra,
    }
    if cuda:
        free1, _ = torch.cuda.mem_get_info()
        result["peak_device_bytes"] = int(torch.cuda.max_memory_reserved())
        result["device_used_bytes"] = int(max(0, free0 - free1))
    if args.fingerprint:
        t1 = time.perf_counter()
        result["crc"], result["fingerprint"] = fingerprint(loaded.tensors)
        result["fingerprint_s"] = time.perf_counter() - t1
    loaded.release()
    return result


def _copy_threads(
    files: list[str], dest: memoryview, threads: int, chunk_bytes: int
) -> tuple[int, float]:
    """Read ``files`` (buffered) into ``dest`` cyclically with ``threads`` threads."""
    slots = max(1, len(dest) // chunk_bytes)

    def where(k: int, i: int, n: int) -> memoryview:
        slot = (i % slots) * chunk_bytes
        return dest[slot : slot + n]

    return parallel_pread(chunk_tasks(files, chunk_bytes), threads, where)


def _ceilings(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.ckpt, encoding="utf-8") as fh:
        ckpt = json.load(fh)
    files = list(ckpt["safetensors_files"])
    total = sum(os.path.getsize(f) for f in files)
    device = args.device
    cuda = device.startswith("cuda")
    chunk = min(16 * MiB, max(MiB, total // 8))
    buf_bytes = max(chunk, min(1 << 30, total) // chunk * chunk)
    out: dict[str, Any] = {"host": [], "h2d": None}
    torch: Any = None
    if cuda:
        import torch

        torch.cuda.set_device(torch.device(device))
        t0 = time.perf_counter()
        host = torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=True)
        out["pin_alloc_s"] = time.perf_counter() - t0
        host.fill_(1)
        view = memoryview(host.numpy()).cast("B")
    else:
        import mmap

        anon = mmap.mmap(-1, buf_bytes)
        view = memoryview(anon)
        for off in range(0, buf_bytes, chunk):  # fault the pages in before timing
            view[off : off + chunk] = b"\x01" * len(view[off : off + chunk])
    ncpu = os.cpu_count() or 1
    counts = sorted({t for t in (args.threads or [min(4, ncpu), min(16, ncpu)]) if t > 0})
    for threads in counts:
        nbytes, seconds = _copy_threads(files, view, threads, chunk)
        out["host"].append(
            {"threads": threads, "nbytes": nbytes, "seconds": seconds, "pinned": cuda}
        )
    if cuda:
        out["h2d"] = _h2d(torch, host, device, args.h2d_bytes or total)
    view.release()
    return out


def _h2d(torch: Any, host: Any, device: str, nbytes: int) -> dict[str, Any]:
    """Pinned -> device copies in 64 MB chunks spread over 4 streams."""
    chunk = min(64 * MiB, host.numel())
    slots = max(1, host.numel() // chunk)
    dev = torch.empty(slots * chunk, dtype=torch.uint8, device=device)
    streams = [torch.cuda.Stream(device=device) for _ in range(4)]
    count = max(slots, -(-nbytes // chunk))

    def run(n: int) -> None:
        for i in range(n):
            s = streams[i % len(streams)]
            off = (i % slots) * chunk
            with torch.cuda.stream(s):
                dev[off : off + chunk].copy_(host[off : off + chunk], non_blocking=True)
        for s in streams:
            s.synchronize()

    run(min(count, slots))  # warm-up
    t0 = time.perf_counter()
    run(count)
    seconds = time.perf_counter() - t0
    return {"nbytes": count * chunk, "seconds": seconds, "chunk_bytes": chunk, "streams": 4}


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from fastckpt.bench import generate

    if not args.workdir:
        raise ValueError("generate mode needs --workdir")
    probe = _probe(args.device)  # first: refuse a device this machine lacks before generating
    check_device(probe, args.device)
    if args.checkpoint:
        ckpt, notes = generate.existing_checkpoint(
            args.checkpoint, args.workdir, with_torch_bin=args.torch_bin, with_fastckpt=args.convert
        )
    else:
        ckpt, notes = generate.generate_checkpoint(
            args.workdir,
            args.size_bytes,
            seed=args.seed,
            shard_bytes=args.shard_bytes or None,
            with_torch_bin=args.torch_bin,
            with_fastckpt=args.convert,
        )
    # The reference every loader is compared with: safetensors' own reader, on CPU.
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors: dict[str, Any] = {}
    for f in ckpt.safetensors_files:
        tensors.update(load_file(f, device="cpu"))
    algo, fp = fingerprint(tensors)
    reference = {"crc": algo, "fingerprint": fp, "seconds": time.perf_counter() - t0}
    return {"checkpoint": ckpt.to_json(), "notes": notes, "probe": probe, "reference": reference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastckpt.bench.worker")
    parser.add_argument("mode", choices=("probe", "load", "ceilings", "generate", "measure"))
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--ckpt", help="JSON file describing the checkpoint set")
    parser.add_argument("--loader", choices=sorted(loaders.LOADERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fingerprint", action="store_true")
    parser.add_argument("--threads", type=int, action="append")
    parser.add_argument("--h2d-bytes", type=int, default=0)
    parser.add_argument("--module", help="measure mode: the scenario module")
    parser.add_argument("--spec", help="measure mode: the measurement, as JSON")
    gen = parser.add_argument_group("generate mode")
    gen.add_argument("--workdir")
    gen.add_argument("--size-bytes", type=int, default=0)
    gen.add_argument("--checkpoint", default="", help="use this checkpoint instead of generating")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--shard-bytes", type=int, default=0)
    gen.add_argument("--torch-bin", action="store_true")
    gen.add_argument("--convert", action="store_true")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"mode": args.mode, "ok": False}
    status = 1
    try:
        if args.mode == "probe":
            out["probe"] = _probe(args.device)
        elif args.mode == "load":
            if not args.loader or not args.ckpt:
                raise ValueError("load mode needs --loader and --ckpt")
            out.update(_load(args))
        elif args.mode == "generate":
            out.update(_generate(args))
        elif args.mode == "measure":
            if not args.module or args.spec is None:
                raise ValueError("measure mode needs --module and --spec")
            module = importlib.import_module(args.module)
            out.update(module.measure(json.loads(args.spec)))
            out.setdefault("peak_rss_bytes", status_bytes("VmHWM"))
        else:
            if not args.ckpt:
                raise ValueError("ceilings mode needs --ckpt")
            out.update(_ceilings(args))
        out["ok"] = True
        status = 0
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=20)
        if isinstance(exc, KeyboardInterrupt):
            status = 130
    tmp = args.result + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    os.replace(tmp, args.result)
    return status


if __name__ == "__main__":
    sys.exit(main())
