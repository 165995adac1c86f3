"""Calibration through fastckpt's own load path.

The measuring seam is ``LoadFn``: "load this checkpoint and return (bytes, seconds)". The default,
``fastckpt_load_fn``, calls ``fastckpt.load(..., stats=True)`` and returns the ``LoadStats``'
``nbytes`` and ``seconds``, so the profile describes the path real loads take; a different loader
(e.g. a ``fastckpt.Loader`` session) is calibrated by passing another callable.

Tiers measured on one machine:

- ``dram``: checkpoint files in the page cache (warm path);
- ``disk``: the same files after evicting them from the page cache (cold path; on a VM whose host
  caches its disk this measures the host cache, not the device).

torch and fastckpt's compiled core are imported only inside the functions that need them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastckpt.sched.model import SchedError
from fastckpt.sched.profile import MachineProfile, Sample, TierFit, fit_tier, profile_from_fits

LoadFn = Callable[[str], tuple[int, float]]
PrepareFn = Callable[[str], None]

DEFAULT_SIZES_MIB = (64, 128, 256)
TIERS = ("dram", "disk")


def fastckpt_load_fn(device: str = "cpu") -> LoadFn:
    """A ``LoadFn`` that loads with ``fastckpt.load(path, device, stats=True)`` and times it until
    the weights are usable: on CPU until one byte of every 4 KiB page of every tensor has been
    read (a page-cached load is a lazy mapping whose work happens on first touch), on a GPU until
    the device has synchronized. A start is only over when the model can run."""

    def load(path: str) -> tuple[int, float]:
        import time

        import fastckpt

        t0 = time.perf_counter()
        tensors, stats = fastckpt.load(path, device, stats=True)
        make_usable(tensors.values(), device)
        seconds = time.perf_counter() - t0
        del tensors
        return int(stats.nbytes), seconds

    return load


def make_usable(tensors: Iterable[object], device: str) -> None:
    """Wait until loaded tensors can be used: on a GPU until the device has synchronized, on
    CPU until one byte of every 4 KiB page has been read (a page-cached load is a lazy mapping
    whose work happens on first touch)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return
    total = 0
    for t in tensors:
        assert isinstance(t, torch.Tensor)
        if t.numel() and t.device.type == "cpu":
            flat = t.detach().reshape(-1).view(torch.uint8)
            total += int(flat[::4096].sum())
    del total


def _files(path: str) -> list[str]:
    p = Path(path)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.iterdir() if f.is_file())


def evict(path: str) -> None:
    """Evict a checkpoint's files from the page cache (prepares a ``disk`` measurement)."""
    from fastckpt.io_engine import drop_page_cache

    for f in _files(path):
        drop_page_cache(f)


def warm(path: str) -> None:
    """Read a checkpoint's files once so they are in the page cache (prepares ``dram``)."""
    for f in _files(path):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass


PREPARE: Mapping[str, PrepareFn] = {"dram": warm, "disk": evict}


@dataclass(frozen=True)
class TierRun:
    """Every sample measured for one tier, in order, and the fit."""

    tier: str
    samples: tuple[Sample, ...]
    warmup: int
    fit: TierFit


def measure_tier(
    tier: str,
    load: LoadFn,
    checkpoints: Sequence[str],
    *,
    prepare: PrepareFn | None = None,
    repeats: int = 3,
    warmup_rounds: int = 1,
) -> TierRun:
    """Load every checkpoint ``warmup_rounds + repeats`` times, interleaved, and fit.

    Rounds visit the checkpoints in alternating order (forward, backward, ...) so slow drifts of
    a shared machine do not line up with size. The first ``warmup_rounds`` rounds are discarded.
    """
    if repeats < 1 or warmup_rounds < 0:
        raise SchedError("repeats must be >= 1 and warmup_rounds >= 0")
    if len(set(checkpoints)) < 2:
        raise SchedError("calibration needs at least 2 checkpoints of different sizes")
    samples: list[Sample] = []
    for r in range(warmup_rounds + repeats):
        order = list(checkpoints) if r % 2 == 0 else list(reversed(checkpoints))
        for ckpt in order:
            if prepare is not None:
                prepare(ckpt)
            nbytes, seconds = load(ckpt)
            samples.append(Sample(int(nbytes), float(seconds)))
    warmup = warmup_rounds * len(checkpoints)
    return TierRun(tier, tuple(samples), warmup, fit_tier(samples, warmup=warmup))


def calibrate(
    load: LoadFn,
    checkpoints: Sequence[str],
    *,
    device: str = "cpu",
    tiers: Sequence[str] = TIERS,
    prepare: Mapping[str, PrepareFn] | None = None,
    repeats: int = 3,
    warmup_rounds: int = 1,
) -> tuple[MachineProfile, list[TierRun]]:
    """Measure each tier with ``load`` over ``checkpoints`` and build a machine profile."""
    prep = dict(PREPARE if prepare is None else prepare)
    runs = []
    for tier in tiers:
        if tier not in prep:
            raise SchedError(f"no way to prepare tier {tier!r} (known: {sorted(prep)})")
        runs.append(
            measure_tier(
                tier,
                load,
                checkpoints,
                prepare=prep[tier],
                repeats=repeats,
                warmup_rounds=warmup_rounds,
            )
        )
    profile = profile_from_fits(device, {r.tier: r.fit for r in runs}, host=socket.gethostname())
    return profile, runs


def write_checkpoints(directory: str, sizes_bytes: Sequence[int]) -> list[str]:
    """Write one fastckpt checkpoint per size (bf16 tensors of ~16 MiB) under ``directory``."""
    import torch

    import fastckpt

    out = []
    for size in sizes_bytes:
        if size < 4096:
            raise SchedError(f"calibration checkpoint size {size} is too small (min 4096 bytes)")
        target = os.path.join(directory, f"calib-{size}")
        if os.path.exists(target):
            shutil.rmtree(target)
        chunk = 8 << 20  # elements of 2 bytes = 16 MiB
        elems = size // 2
        sd = {}
        k = 0
        while elems > 0:
            n = min(chunk, elems)
            sd[f"layers.{k}.weight"] = torch.arange(n, dtype=torch.float32).to(torch.bfloat16)
            elems -= n
            k += 1
        fastckpt.save(sd, target, progress=False)
        out.append(target)
    return out
