"""Scenario ``gpu-check``: the measurements the prepared GPU check makes, most important first.

``benchmarks/gpu_check.sh`` runs it on a lent GPU box (minutes of device time, so the order
matters and every result is written to ``--check-json`` as soon as it exists):

1. ``ceilings``: pinned host -> GPU (64 MiB copies on 4 streams), and the combined ceiling: page
   cache -> pinned memory on 16 threads while 4 streams copy to the GPU, on the checkpoint's own
   files;
2. ``first_load``: a fresh process's first warm load (the staging ring is pinned inside it), of
   the converted checkpoint and of the stock safetensors shards;
3. ``warm_repeat``: the same process loading again (the ring is there);
4. ``dram_tier``: a Loader with a DRAM tier: the filling load, the background pinning of the
   item, then hits (copies from pinned memory);
5. ``gpu_tier``: a Loader with a GPU tier: revived buffers after the caller dropped the tensors;
6. ``iter_tensors``: ``fastckpt.iter_tensors`` to the GPU, the consumer dropping each tensor: time,
   bytes read through O_DIRECT (0 for a warm file), peak extra device memory;
7. ``cold``: the disk ceiling (fio O_DIRECT, else the engine) and a cold load of the same files.

Peers (safetensors, torch.load, Run:ai, fastsafetensors, InstantTensor) are the default ``load``
scenario's job, run by the script after this one on the same checkpoint (``--keep``).

``--fake-device`` runs everything on CPU with the device path on a fake device (host memory, a
``FakeCopyBackend``): the script's dry run, which the tests smoke-run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fastckpt.bench.common import drop_from_page_cache, log, read_through
from fastckpt.bench.harness import Context, Skipped

HELP = "the prepared GPU check: ceilings, first/repeated loads, DRAM and GPU tiers, iterator, cold"
BASELINES: dict[str, str] = {}

MiB = 1 << 20


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--fake-device",
        action="store_true",
        help="gpu-check: run the device path on a fake device made of host memory (a dry run)",
    )
    group.add_argument(
        "--check-json",
        default=None,
        help="gpu-check: the JSON file written after every step (default OUT/gpu_check.json)",
    )


def plan(ctx: Context) -> list[Any]:
    fake = bool(ctx.option("fake_device"))
    if not ctx.device.startswith("cuda"):
        raise Skipped("gpu-check measures a device: pass --device cuda:N (or --fake-device)")
    if not fake:
        import torch

        if not torch.cuda.is_available():
            raise Skipped("CUDA is not available here (use --fake-device for a dry run)")
    return []


class Recorder:
    """Steps and their results, written to ``path`` after every step."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "steps": {}, "order": []}
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log(f"gpu-check: {name} ...")
        t0 = time.perf_counter()
        try:
            out = fn()
            out.setdefault("ok", True)
        except Exception as exc:  # one failed step must not stop the others
            import traceback

            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out["traceback"] = traceback.format_exc(limit=12)
        out["step_s"] = round(time.perf_counter() - t0, 3)
        self.data["steps"][name] = out
        self.data["order"].append(name)
        self.write()
        shown = {k: v for k, v in out.items() if k not in ("traceback", "stats", "runs")}
        log(f"gpu-check: {name}: {json.dumps(shown, default=str)[:600]}")
        return out


def measure_all(ctx: Context) -> list[dict[str, Any]]:
    import torch

    from fastckpt.bench.generate import generate_checkpoint

    fake = bool(ctx.option("fake_device"))
    device = ctx.device
    out_json = ctx.option("check_json") or os.path.join(ctx.args.out, "gpu_check.json")
    header = {
        "device": device,
        "fake_device": fake,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if not fake else "fake (host memory)",
        "cpus": os.cpu_count(),
        "size_bytes": ctx.size_bytes,
    }
    rec = Recorder(out_json, header)
    t0 = time.perf_counter()
    ckpt, notes = generate_checkpoint(
        ctx.workdir, ctx.size_bytes, with_torch_bin=True, with_fastckpt=True
    )
    rec.data["checkpoint"] = {
        "root": ckpt.root,
        "nbytes": ckpt.nbytes,
        "tensors": ckpt.tensors,
        "generate_s": round(time.perf_counter() - t0, 2),
        "notes": notes,
    }
    rec.write()
    if ckpt.fastckpt_dir is None:
        raise RuntimeError(f"the checkpoint could not be converted: {notes}")
    ctx.shared["checkpoint_root"] = ckpt.root
    fck = ckpt.fastckpt_dir
    fck_files = list(ckpt.fastckpt_files())
    st_path = ckpt.safetensors_path
    read_through(fck_files + list(ckpt.safetensors_files))
    env = _Env(device, fake, ckpt.nbytes)

    rec.run("ceilings", lambda: _ceilings(env, fck_files))
    rec.run("first_load", lambda: _first_loads(env, {"fastckpt": fck, "fastckpt-st": st_path}))
    rec.run("warm_repeat", lambda: _warm_repeat(env, fck))
    rec.run("dram_tier", lambda: _dram_tier(env, fck))
    rec.run("gpu_tier", lambda: _gpu_tier(env, fck))
    rec.run("iter_tensors", lambda: _iterator(env, fck))
    rec.run("cold", lambda: _cold(env, fck, fck_files))
    rec.data["total_s"] = round(time.perf_counter() - t0, 2)
    rec.write()
    rows = []
    for name in rec.data["order"]:
        step = rec.data["steps"][name]
        for key, value in step.items():
            if key.endswith("_s_median") and isinstance(value, (int, float)):
                rows.append(
                    {
                        "ok": step.get("ok", False),
                        "method": f"{name}.{key.removesuffix('_s_median')}",
                        "state": "warm" if name != "cold" else "cold",
                        "round": 0,
                        "seconds": float(value),
                        "nbytes": ckpt.nbytes,
                        "error": step.get("error"),
                    }
                )
    return rows


def describe(ctx: Context) -> dict[str, Any]:
    return {"checkpoint": ctx.shared.get("checkpoint_root")}


# ------------------------------------------------------------------------------- helpers
class _Env:
    def __init__(self, device: str, fake: bool, nbytes: int) -> None:
        self.device = device
        self.fake = fake
        self.nbytes = nbytes

    def loader(self, **settings: Any) -> Any:
        import fastckpt

        if self.fake:
            from fastckpt.loader.devstage import fake_stage_factory

            return fastckpt.Loader(device_stage=fake_stage_factory(slot_bytes=4 * MiB), **settings)
        return fastckpt.Loader(**settings)

    def sync(self) -> None:
        if not self.fake:
            import torch

            torch.cuda.synchronize(self.device)

    def gbps(self, seconds: float) -> float:
        return round(self.nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0


def _stats(st: Any) -> dict[str, Any]:
    keep = (
        "seconds",
        "gbps",
        "path_taken",
        "engine",
        "read_wait_s",
        "copy_wait_s",
        "ring_s",
        "alloc_s",
        "finalize_s",
        "copies",
        "max_copies_in_flight",
        "notes",
    )
    d = st.as_dict()
    return {k: d[k] for k in keep if k in d}


def _timed(env: _Env, fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    env.sync()
    return time.perf_counter() - t0, value


def _ceilings(env: _Env, files: list[str]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    if not env.fake:
        dev = torch.device(env.device)
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        streams = [torch.cuda.Stream(dev) for _ in range(4)]
        runs = []
        for _ in range(3):
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for i, lo in enumerate(range(0, 1 << 30, 64 * MiB)):
                with torch.cuda.stream(streams[i % 4]):
                    dst[lo : lo + 64 * MiB].copy_(host[lo : lo + 64 * MiB], non_blocking=True)
            torch.cuda.synchronize(dev)
            runs.append(time.perf_counter() - t0)
        out["pinned_to_gpu_gbps"] = round((1 << 30) / statistics.median(runs) / 1e9, 2)
        del host, dst
    seconds, nbytes = _combined(env, files)
    out["combined_gbps"] = round(nbytes / seconds / 1e9, 2)
    out["combined_what"] = "page cache -> pinned host on 16 threads" + (
        "" if env.fake else ", 4 streams to the GPU"
    )
    return out


def _combined(env: _Env, files: list[str], threads: int = 16) -> tuple[float, int]:
    """Page cache -> pinned memory on ``threads`` threads, each read copied to the GPU on one of
    4 streams (two pinned buffers per thread, reused once their copy completed)."""
    import torch

    chunk = 32 * MiB
    tasks = [(f, off) for f in files for off in range(0, os.path.getsize(f), chunk)]
    dev = None if env.fake else torch.device(env.device)
    dst = torch.empty(chunk * 64, dtype=torch.uint8, device=dev) if dev is not None else None
    streams = [torch.cuda.Stream(dev) for _ in range(4)] if dev is not None else []
    lock = threading.Lock()
    total = [0]

    def work(tid: int) -> None:
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=dev is not None) for _ in (0, 1)]
        events: list[Any] = [None, None]
        fds: dict[str, int] = {}
        done = 0
        try:
            for k, (f, off) in enumerate(tasks[tid::threads]):
                i = k % 2
                if events[i] is not None:
                    events[i].synchronize()
                fd = fds.get(f)
                if fd is None:
                    fd = fds[f] = os.open(f, os.O_RDONLY)
                n = os.preadv(fd, [memoryview(bufs[i].numpy())], off)  # type: ignore[arg-type]
                done += n
                if dev is not None and dst is not None:
                    s = streams[tid % 4]
                    slot = (tid * 2 + i) % 64
                    with torch.cuda.stream(s):
                        dst[slot * chunk : slot * chunk + n].copy_(bufs[i][:n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(s)
                    events[i] = ev
        finally:
            for fd in fds.values():
                os.close(fd)
            for ev in events:
                if ev is not None:
                    ev.synchronize()
        with lock:
            total[0] += done

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    env.sync()
    return time.perf_counter() - t0, total[0]


_CHILD = r"""
import json, sys, time
import torch
import fastckpt
path, device, fake = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if fake:
    from fastckpt.loader.devstage import fake_stage_factory
    loader = fastckpt.Loader(device_stage=fake_stage_factory(slot_bytes=4 << 20))
else:
    torch.empty(1, device=device)  # the CUDA context is not the loader's cost
    loader = fastckpt.Loader()
t0 = time.perf_counter()
tensors, st = loader.load(path, device, stats=True)
if not fake:
    torch.cuda.synchronize(device)
first = time.perf_counter() - t0
ring = loader.cache_info()["ring"]
print(json.dumps({"first_s": first, "stats": st.as_dict(), "ring": ring}, default=str))
"""


def _first_loads(env: _Env, paths: dict[str, str]) -> dict[str, Any]:
    """The first load of a fresh process, of each form: the machine's very first (it measures
    the pinning methods once and stores them with the machine profile), then a typical one."""
    out: dict[str, Any] = {}
    runs = [("machine_first", paths["fastckpt"]), *paths.items()]
    for name, path in runs:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, path, env.device, "1" if env.fake else "0"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            out[name] = {"ok": False, "error": proc.stderr[-2000:]}
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        st = got["stats"]
        out[name] = {
            "first_s": round(got["first_s"], 4),
            "gbps": env.gbps(got["first_s"]),
            "ring_s": st.get("ring_s"),
            "copies": st.get("copies"),
            "max_copies_in_flight": st.get("max_copies_in_flight"),
            "path_taken": st.get("path_taken"),
            "ring": got["ring"],
        }
    out["fastckpt_first_s_median"] = out.get("fastckpt", {}).get("first_s", 0.0)
    return out


def _repeat_loads(
    env: _Env, loader: Any, path: str, repeats: int, *, collect: bool = False
) -> tuple[list[float], Any]:
    """Time ``repeats`` loads of ``path`` by ``loader``; the seconds of each and the last
    ``LoadStats``. ``collect`` runs the garbage collector after each, so a GPU-tier hit finds
    the buffers the previous load left idle."""
    runs: list[float] = []
    last = None
    for _ in range(repeats):
        seconds, (tensors, st) = _timed(env, lambda: loader.load(path, env.device, stats=True))
        runs.append(seconds)
        last = st
        del tensors
        if collect:
            gc.collect()
    return runs, last


def _warm_repeat(env: _Env, path: str, repeats: int = 3) -> dict[str, Any]:
    with env.loader() as loader:
        loader.load(path, env.device)  # the first load (ring, engine) is not a repeat
        env.sync()
        runs, last = _repeat_loads(env, loader, path, repeats)
        ring = loader.cache_info()["ring"]
    med = statistics.median(runs)
    return {
        "warm_s_median": round(med, 4),
        "gbps": env.gbps(med),
        "runs": [round(r, 4) for r in runs],
        "stats": _stats(last) if last is not None else None,
        "ring": ring,
    }


def _dram_tier(env: _Env, path: str, repeats: int = 3) -> dict[str, Any]:
    budget = int(env.nbytes * 1.3) + (256 * MiB)
    with env.loader(dram_tier_bytes=budget) as loader:
        fill_s, (tensors, fill_st) = _timed(env, lambda: loader.load(path, env.device, stats=True))
        del tensors
        t0 = time.perf_counter()
        pinned = _wait_pinned(loader, timeout_s=120.0)
        pin_s = time.perf_counter() - t0
        runs, last = _repeat_loads(env, loader, path, repeats)
    med = statistics.median(runs)
    return {
        "hit_s_median": round(med, 4),
        "gbps": env.gbps(med),
        "fill_s": round(fill_s, 4),
        "fill_path": fill_st.path_taken,
        "pin_wait_after_fill_s": round(pin_s, 4),
        "pinned_fraction": pinned,
        "first_hit_s": round(runs[0], 4),
        "runs": [round(r, 4) for r in runs],
        "stats": _stats(last) if last is not None else None,
    }


def _wait_pinned(loader: Any, timeout_s: float) -> float:
    """Wait until the DRAM tier's items are pinned (the background pinning after a fill);
    returns the fraction of bytes pinned."""
    deadline = time.monotonic() + timeout_s
    frac = 0.0
    while time.monotonic() < deadline:
        total = pinned = 0
        for key in loader.dram_tier.keys():  # noqa: SIM118 - a tier, not a dict
            item = loader.dram_tier.peek(key)
            if item is None:
                continue
            for block in item.blocks.values():
                total += block.nbytes
                pinned += min(block.nbytes, block.pinned_bytes)
        frac = pinned / total if total else 0.0
        if frac >= 1.0 or loader.simulated_devices:
            return frac
        time.sleep(0.01)
    return frac


def _gpu_tier(env: _Env, path: str, repeats: int = 3) -> dict[str, Any]:
    budget = int(env.nbytes * 1.3) + (256 * MiB)
    with env.loader(gpu_tier_bytes=budget) as loader:
        tensors = loader.load(path, env.device)
        count = len(tensors)
        del tensors
        gc.collect()
        runs, last = _repeat_loads(env, loader, path, repeats, collect=True)
    med = statistics.median(runs)
    return {
        "hit_s_median": round(med, 5),
        "hit_ms": round(med * 1e3, 3),
        "tensors": count,
        "per_tensor_us": round(med * 1e6 / max(count, 1), 2),
        "path_taken": last.path_taken if last is not None else None,
        "runs": [round(r, 5) for r in runs],
    }


def _iterator(env: _Env, path: str) -> dict[str, Any]:
    import torch

    import fastckpt

    with env.loader() as loader:
        engine = loader.engine()
        direct0, read0 = engine.bytes_direct, engine.bytes_read
        if not env.fake:
            torch.cuda.synchronize(env.device)
            base = torch.cuda.memory_allocated(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
        count = 0
        t0 = time.perf_counter()
        for _name, tensor in fastckpt.iter_tensors(path, env.device, loader=loader):
            count += 1
            del tensor  # a consumer that copies each weight elsewhere
        env.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(env.device) - base if not env.fake else None
        direct = engine.bytes_direct - direct0
        read = engine.bytes_read - read0
    return {
        "iter_s_median": round(seconds, 4),
        "gbps": env.gbps(seconds),
        "tensors": count,
        "bytes_read": read,
        "bytes_read_direct": direct,
        "peak_extra_device_bytes": peak,
    }


def _cold(env: _Env, path: str, files: list[str]) -> dict[str, Any]:
    from fastckpt.bench.ceilings import engine_read, find_fio, fio_read

    out: dict[str, Any] = {}
    fio = find_fio()
    drop_from_page_cache(files)
    with contextlib.suppress(Exception):
        if fio is not None:
            nbytes, seconds, how = fio_read(fio, files)
        else:
            nbytes, seconds, how = engine_read(files)
        out["disk_direct_gbps"] = round(nbytes / seconds / 1e9, 3)
        out["disk_direct_how"] = how
    drop_from_page_cache(files)
    with env.loader() as loader:
        seconds, (tensors, st) = _timed(env, lambda: loader.load(path, env.device, stats=True))
        del tensors
    out["cold_s_median"] = round(seconds, 3)
    out["gbps"] = env.gbps(seconds)
    out["stats"] = _stats(st)
    if out.get("disk_direct_gbps"):
        out["of_disk_ceiling"] = round(out["gbps"] / out["disk_direct_gbps"], 3)
    return out
