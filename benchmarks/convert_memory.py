#!/usr/bin/env python3
"""Peak host memory of ``fastckpt.convert`` on a multi-GB sharded safetensors source.

Generates a sharded safetensors checkpoint (``--total-bytes``, default 3 GB, in tensors of
``--tensor-bytes``) in a scratch directory under ``--dir``, converts it in a fresh subprocess and
reports that process's peak resident set (``VmHWM`` from /proc, and ``ru_maxrss``), next to the
same interpreter's peak after the imports alone. The claim under test: peak memory is about the
write buffer plus one tensor (for safetensors sources, the write buffer alone), whatever the size
of the model. The scratch directory is deleted afterwards unless ``--keep``.

    python benchmarks/convert_memory.py                    # 3 GB, the documented run
    python benchmarks/convert_memory.py --total-bytes 50MB # quick look

The last line of output is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

_CHILD_CODE = r"""
import json, os, resource, sys, time

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

from fastckpt.format.convert import convert
if sys.argv[4] == "torch":
    import torch
before = hwm()
t0 = time.perf_counter()
if sys.argv[3] == "convert":
    index = convert(sys.argv[1], sys.argv[2], progress=False)
    nbytes = index.nbytes
else:
    nbytes = 0
seconds = time.perf_counter() - t0
print(json.dumps({
    "import_hwm_bytes": before,
    "hwm_bytes": hwm(),
    "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "seconds": seconds,
    "nbytes": nbytes,
    "torch_imported": "torch" in sys.modules,
}))
"""


def parse_bytes(text: str) -> int:
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20}
    units["GIB"] = 1 << 30
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    return int(float(num) * units[t[len(num) :]])


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "ram_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def generate(root: str, total: int, tensor_nbytes: int, shards: int) -> tuple[int, int]:
    """Write a sharded safetensors checkpoint of ``total`` bytes; returns (tensors, bytes)."""
    os.makedirs(root)
    count = max(1, total // tensor_nbytes)
    elems = tensor_nbytes // 2  # bf16
    block = os.urandom(1 << 22)
    weight_map: dict[str, str] = {}
    per_shard = -(-count // shards)
    written = 0
    for s in range(shards):
        names = [
            f"model.layers.{i}.weight"
            for i in range(s * per_shard, min(count, (s + 1) * per_shard))
        ]
        if not names:
            break
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for k, name in enumerate(names):
            header[name] = {
                "dtype": "BF16",
                "shape": [elems],
                "data_offsets": [k * elems * 2, (k + 1) * elems * 2],
            }
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(root, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            left = len(names) * elems * 2
            view = memoryview(block)
            while left:
                n = min(left, len(view))
                f.write(view[:n])
                left -= n
            written += len(names) * elems * 2
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": written}, "weight_map": weight_map}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write("{}")
    return count, written


def generate_torch(root: str, total: int, tensor_nbytes: int) -> tuple[int, int]:
    """Write one zip-format ``pytorch_model.bin`` of ``total`` bytes; returns (tensors, bytes)."""
    import torch

    os.makedirs(root)
    count = max(1, total // tensor_nbytes)
    elems = tensor_nbytes // 2
    block = torch.frombuffer(bytearray(os.urandom(elems * 2)), dtype=torch.bfloat16)
    sd = {f"model.layers.{i}.weight": block.clone() for i in range(count)}
    torch.save(sd, os.path.join(root, "pytorch_model.bin"))
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write("{}")
    return count, count * elems * 2


def run_child(src: str, dst: str, mode: str, preimport: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD_CODE, src, dst, mode, preimport],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child failed with status {out.returncode}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--total-bytes", type=parse_bytes, default=3 * 10**9)
    ap.add_argument("--tensor-bytes", type=parse_bytes, default=128 << 20)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument(
        "--source",
        choices=["safetensors", "torch"],
        default="safetensors",
        help="sharded safetensors (default), or one zip-format pytorch_model.bin (torch.load "
        "mmap; its mapped file pages count in RSS)",
    )
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="scratch space parent")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)

    from fastckpt.config import get_config

    work = tempfile.mkdtemp(prefix="fastckpt-convert-mem-", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        dst = os.path.join(work, "dst")
        t0 = time.perf_counter()
        if args.source == "torch":
            count, nbytes = generate_torch(src, args.total_bytes, args.tensor_bytes)
            shards = 1
        else:
            count, nbytes = generate(src, args.total_bytes, args.tensor_bytes, args.shards)
            shards = args.shards
        gen_s = time.perf_counter() - t0
        idle = run_child(src, dst, "import-only", args.source)
        res = run_child(src, dst, "convert", args.source)
        children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        cfg = get_config()
        mib = 1 << 20
        seconds = float(res["seconds"])
        peak, after_imports, idle_peak = (
            int(res["hwm_bytes"]),
            int(res["import_hwm_bytes"]),
            int(idle["hwm_bytes"]),
        )
        host = machine()
        result = {
            "machine": host,
            "source_bytes": nbytes,
            "tensors": count,
            "largest_tensor_bytes": (args.tensor_bytes // 2) * 2,
            "source": args.source,
            "shards": shards,
            "write_buffer_bytes": cfg.write_buffer_bytes,
            "generate_seconds": round(gen_s, 3),
            "convert_seconds": round(seconds, 3),
            "convert_gbps": round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0,
            "peak_rss_bytes": peak,
            "peak_rss_after_imports_bytes": after_imports,
            "idle_interpreter_peak_rss_bytes": idle_peak,
            "children_ru_maxrss_bytes": children_maxrss,
            "torch_imported": res["torch_imported"],
        }
        print(
            f"machine: {host['cpus']} CPUs, {host['ram_bytes'] / 2**30:.1f} GiB RAM, "
            f"Python {host['python']}, {host['platform']}"
        )
        print(
            f"source: {nbytes / 1e9:.3f} GB {args.source}, {count} tensors of "
            f"{args.tensor_bytes / mib:.0f} MiB in {shards} file(s) "
            f"(generated in {gen_s:.1f} s)"
        )
        print(
            f"convert: {seconds:.2f} s, {result['convert_gbps']} GB/s; "
            f"write buffer {cfg.write_buffer_bytes / mib:.0f} MiB"
        )
        print(
            f"peak RSS of the converting process: {peak / mib:.1f} MiB (after imports: "
            f"{after_imports / mib:.1f} MiB; idle interpreter: {idle_peak / mib:.1f} MiB; "
            f"torch imported: {res['torch_imported']})"
        )
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
