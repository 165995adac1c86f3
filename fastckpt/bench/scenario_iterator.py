"""Scenario ``iterator``: ``fastckpt.iter_tensors`` (one tensor at a time, storage order) beside
``fastckpt.load`` (every tensor at once) on the same checkpoint, cold and warm: time and peak RSS.

Done means usable: on a CPU every page of every tensor is touched once (``load``: after the
call; ``iter_tensors``: each tensor as it arrives, then dropped, as a consumer that copies
weights elsewhere would), a GPU target is synchronised. The peak RSS column is the process's
``VmHWM`` (imports included); ``extra.rss_before_bytes`` is the RSS just before the timed part.
The checkpoint is ``--checkpoint`` or one generated of ``--size`` (fastckpt format).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from fastckpt.bench.harness import Context, Measurement
from fastckpt.bench.scenario_tiers import checkpoint

HELP = "fastckpt.iter_tensors beside fastckpt.load: time and peak RSS, cold and warm"
BASELINES = {"iterator": "load"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """No options of its own: ``--checkpoint``, ``--size``, ``--device``, ``--states``."""


def plan(ctx: Context) -> list[Measurement]:
    path, files = checkpoint(ctx)
    return [
        Measurement(method, {"path": path, "method": method}, state=state, files=files)
        for state in ctx.states
        for method in ("load", "iter_tensors")
    ]


def describe(ctx: Context) -> dict[str, Any]:
    return {"checkpoint": ctx.option("checkpoint") or "generated"}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import fastckpt
    from fastckpt.bench.worker import status_bytes, touch_pages

    path, device = spec["path"], spec["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.empty(1, device=device)  # the CUDA context is not the loader's cost
    rss_before = status_bytes("VmRSS")
    nbytes = tensors = 0
    t0 = time.perf_counter()
    if spec["method"] == "load":
        state = fastckpt.load(path, device)
        if cuda:
            torch.cuda.synchronize(device)
        else:
            touch_pages(state)
        tensors = len(state)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        del state
    else:
        for name, t in fastckpt.iter_tensors(path, device):
            if not cuda:
                touch_pages({name: t})
            tensors += 1
            nbytes += t.numel() * t.element_size()
            del t
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    extra = {"rss_before_bytes": rss_before, "tensors": tensors}
    return {"seconds": seconds, "nbytes": nbytes, "extra": extra}
