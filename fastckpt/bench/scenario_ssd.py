"""Scenario ``ssd-tier``: the first load of a stock safetensors checkpoint with the SSD tier on,
by the way its copy is made (``ssd_convert``), and a second load from the copy, beside a load
without the tier. Every method reads the same files (a LLaMA-like sharded safetensors folder of
``--size``, generated once), each in a fresh process, cold: the files are dropped from the page
cache before each measurement (``--states`` is not used).

- ``no tier``: ``fastckpt.load`` of the folder by a Loader without an SSD tier (the baseline);
- ``safetensors load_file``: ``safetensors.torch.load_file`` of every shard;
- ``first load inline``: an empty SSD tier, ``ssd_convert="inline"``: the conversion, then a
  load of the copy (before this scenario: every first load);
- ``first load background``: an empty SSD tier, ``ssd_convert="background"`` (the default): the
  load reads the source, the conversion starts after it;
- ``first load beside``: the same, with the conversion started just before the load
  (``Loader.prefetch(tier="ssd")``), so both read the source at once;
- ``second load from the copy``: a tier holding the copy (made once by ``plan``; the copy's
  files dropped from the page cache too).

``--ssd-methods`` chooses and orders the methods of a round. ``seconds`` is the load until
usable (every page of every tensor touched); for the first loads ``extra.copy_ready_s`` is the
time from the start until the copy was published and ``extra.kind`` which files the load read
(``safetensors``: the source; ``fastckpt``: a copy); ``extra.load_s`` is the load before
the touch (no tier and first loads). A measurement that made a copy removes it
and flushes the disk (``sync``) before it ends, so its writes do not slow the next one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

from fastckpt.bench.harness import Context, Measurement

HELP = "a first load of stock safetensors with the SSD tier on (conversion inline, after or "
HELP += "beside the load) and a second load from the copy, beside no tier"
BASELINES = {"ssd-tier": "no tier"}
METHODS = {  # --ssd-methods key -> method
    "none": "no tier",
    "load_file": "safetensors load_file",
    "inline": "first load inline",
    "background": "first load background",
    "beside": "first load beside",
    "copy": "second load from the copy",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """``--ssd-methods``; and the shared ``--size``, ``--repeats``, ``--workdir``, ``--keep``."""
    group.add_argument(
        "--ssd-methods",
        default=",".join(METHODS),
        help="ssd-tier: the methods of one round, in order (a method may come more than once: "
        "the harness rotates the order between rounds, so a method always follows the same "
        f"one; repeat one to give two methods the same predecessor); of {', '.join(METHODS)}",
    )


def plan(ctx: Context) -> list[Measurement]:
    import fastckpt
    from fastckpt.bench.generate import generate_checkpoint

    ckpt, _ = generate_checkpoint(
        ctx.workdir, ctx.size_bytes, with_torch_bin=False, with_fastckpt=False
    )
    copy_dir = os.path.join(ctx.workdir, "ssd-with-copy")
    shutil.rmtree(copy_dir, ignore_errors=True)
    with fastckpt.Loader(ssd_tier_bytes=1 << 50, ssd_tier_dir=copy_dir) as ld:
        if not ld.prefetch(ckpt.safetensors_path, tier="ssd").result():
            raise RuntimeError("the SSD tier could not keep the checkpoint")
    copy_files = [os.path.join(d, n) for d, _, names in os.walk(copy_dir) for n in names]
    ctx.shared.update(source=ckpt.safetensors_path, nbytes=ckpt.nbytes, tensors=ckpt.tensors)
    spec = {
        "source": ckpt.safetensors_path,
        "shards": list(ckpt.safetensors_files),
        "copy_dir": copy_dir,
        "scratch": ctx.workdir,
    }
    keys = [k.strip() for k in str(ctx.option("ssd_methods") or ",".join(METHODS)).split(",")]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise ValueError(f"--ssd-methods {unknown or keys}: expected some of {', '.join(METHODS)}")
    return [
        Measurement(
            METHODS[key],
            {**spec, "method": METHODS[key]},
            state="cold",
            files=[*ckpt.safetensors_files, *(copy_files if key == "copy" else [])],
        )
        for key in keys
    ]


def describe(ctx: Context) -> dict[str, Any]:
    return {
        "source": ctx.shared.get("source"),
        "bytes": ctx.shared.get("nbytes"),
        "tensors": ctx.shared.get("tensors"),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import fastckpt
    import fastckpt.loader.api  # imports are not a load's cost
    from fastckpt.bench.worker import touch_pages

    method = spec["method"]
    extra: dict[str, Any] = {}
    if method == "safetensors load_file":
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        state: dict[str, Any] = {}
        for shard in spec["shards"]:
            state.update(load_file(shard))
        touch_pages(state)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "nbytes": _nbytes(state), "extra": extra}
    if method == "no tier":
        with fastckpt.Loader(ssd_tier_bytes=0) as ld:
            t0 = time.perf_counter()
            state, stats = ld.load(spec["source"], stats=True)
            extra["load_s"] = time.perf_counter() - t0  # before the touch
            touch_pages(state)
            seconds = time.perf_counter() - t0
        extra.update(kind=stats.kind, path_taken=stats.path_taken)
        return {"seconds": seconds, "nbytes": _nbytes(state), "extra": extra}
    if method == "second load from the copy":
        with fastckpt.Loader(ssd_tier_bytes=1 << 50, ssd_tier_dir=spec["copy_dir"]) as ld:
            t0 = time.perf_counter()
            state, stats = ld.load(spec["source"], stats=True)
            touch_pages(state)
            seconds = time.perf_counter() - t0
        extra.update(kind=stats.kind, path_taken=stats.path_taken)
        return {"seconds": seconds, "nbytes": _nbytes(state), "extra": extra}
    return _first_load(spec, method, extra)


def _first_load(spec: dict[str, Any], method: str, extra: dict[str, Any]) -> dict[str, Any]:
    import fastckpt
    from fastckpt.bench.worker import touch_pages

    ssd = tempfile.mkdtemp(prefix="ssd-first-", dir=spec["scratch"])
    mode = "inline" if method.endswith("inline") else "background"
    try:
        with fastckpt.Loader(ssd_tier_bytes=1 << 50, ssd_tier_dir=ssd, ssd_convert=mode) as ld:
            t0 = time.perf_counter()
            beside = ld.prefetch(spec["source"], tier="ssd") if method.endswith("beside") else None
            state, stats = ld.load(spec["source"], stats=True)
            extra["load_s"] = time.perf_counter() - t0  # before the touch
            touch_pages(state)
            seconds = time.perf_counter() - t0
            kept = beside.result() if beside is not None else True
            ld.conversions.wait()
            extra["copy_ready_s"] = time.perf_counter() - t0
            info = ld.cache_info()["ssd"]
            extra.update(
                kind=stats.kind,
                path_taken=stats.path_taken,
                kept=bool(kept and info["items"] == 1),
                conversions=info["conversions"]["done"],
            )
        nbytes = _nbytes(state)
        del state
    finally:
        shutil.rmtree(ssd, ignore_errors=True)
        os.sync()  # the copy's writes are not the next measurement's cost
    return {"seconds": seconds, "nbytes": nbytes, "extra": extra}


def _nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
