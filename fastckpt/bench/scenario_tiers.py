"""Scenarios ``dram-tier`` and ``gpu-tier``: a hit of a ``fastckpt.Loader``'s tier beside loads
without a tier, each in a fresh process (the variants of ``tiers_scenario.py``).

A tier hit only exists in a process that loaded the checkpoint before, so every measurement
process builds its Loader (``tiers_scenario.loader_settings``) and loads the checkpoint once,
untimed (this fills the tier, and pays the first-call costs a long-lived process has paid
already: pinned ring, thread pools), then times one more load (``tiers_scenario.timed_load``):
done means usable, so a CPU result has every page touched once (``extra`` splits load and
touch), a GPU load is synchronised. ``cold`` rows drop the files from the page cache between
the two loads, in the measuring process; ``warm`` rows read them before.

- ``dram-tier``: ``no tier`` (page cache mapped), ``no tier, copy`` (warm, page cache copied),
  ``dram-tier hit``; on ``--device cuda:N`` the DRAM tier is pinned memory copied to the GPU.
- ``gpu-tier`` (CUDA; skipped without it): ``no tier``, ``dram-tier hit``, ``gpu-tier hit``.

The checkpoint is ``--checkpoint`` or one generated of ``--size`` (fastckpt format).
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Any

from fastckpt.bench import tiers_scenario
from fastckpt.bench.harness import Context, Measurement, Skipped
from fastckpt.rules.units import MiB

HELP = "a Loader's DRAM / GPU tier hit beside loads without a tier (cold, warm)"
HELPS = {
    "dram-tier": "a Loader's DRAM-tier hit beside loads without a tier (cold, warm)",
    "gpu-tier": "a Loader's GPU-tier hit beside loads without a tier (cold, warm; CUDA)",
}
BASELINES = {"dram-tier": "no tier", "gpu-tier": "no tier"}

METHODS = {  # method -> tiers_scenario.loader_settings variant
    "no tier": "plain",
    "no tier, copy": "copy",
    "dram-tier hit": "dram-tier",
    "gpu-tier hit": "gpu-tier",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """No options of its own: ``--checkpoint``, ``--size``, ``--device``, ``--states``."""


def checkpoint(ctx: Context) -> tuple[str, list[str]]:
    """``--checkpoint`` or a generated fastckpt checkpoint of ``--size`` (reused with
    ``--keep``); its path and its data files."""
    import fastckpt

    given = ctx.option("checkpoint")
    path = os.path.abspath(given) if given else os.path.join(ctx.workdir, "ckpt")
    if not given and not os.path.exists(os.path.join(path, "fastckpt.index")):
        tensor = max(4096, min(64 * MiB, ctx.size_bytes // 4))
        tiers_scenario.generate(path, ctx.size_bytes, tensor_bytes=tensor - tensor % 4096)
    return path, [p.path for p in fastckpt.read_index(path).partitions]


def plan(ctx: Context) -> list[Measurement]:
    cuda = ctx.device.startswith("cuda")
    if ctx.scenario == "gpu-tier":
        if not cuda:
            raise Skipped("gpu-tier loads to a GPU: run it with --device cuda:N")
        import torch

        if not torch.cuda.is_available():
            raise Skipped(f"CUDA is not available to torch {torch.__version__} here")
        methods = ["no tier", "dram-tier hit", "gpu-tier hit"]
    else:
        methods = ["no tier", "dram-tier hit"] + ([] if cuda else ["no tier, copy"])
    path, files = checkpoint(ctx)
    out = []
    for state in ctx.states:
        for method in methods:
            if method == "no tier, copy" and state != "warm":
                continue
            spec = {"path": path, "variant": METHODS[method], "cold": state == "cold"}
            warm_files = files if state == "warm" else ()
            out.append(Measurement(method, spec, state=state, files=warm_files))
    return out


def describe(ctx: Context) -> dict[str, Any]:
    return {
        "checkpoint": ctx.option("checkpoint") or "generated",
        "timed": "the second load of a fresh process (the first, untimed, fills the tier), "
        "plus the first touch of every page on a CPU",
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import fastckpt

    path, variant, device = spec["path"], spec["variant"], spec["device"]
    nbytes = sum(p.nbytes for p in fastckpt.read_index(path).partitions)
    with fastckpt.Loader(**tiers_scenario.loader_settings(variant, nbytes)) as loader:
        first = loader.load(path, device)  # untimed: fills the tier, first-call costs
        del first
        gc.collect()
        if spec["cold"]:
            tiers_scenario.drop(path)
        load_s, touch_s, taken = tiers_scenario.timed_load(loader, path, device)
    if variant.endswith("-tier") and taken != variant:
        raise RuntimeError(f"the {variant} variant's timed load took {taken!r}, not a tier hit")
    extra = {"load_s": load_s, "touch_s": touch_s, "path_taken": taken}
    return {"seconds": load_s + touch_s, "nbytes": nbytes, "extra": extra}
