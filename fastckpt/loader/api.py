"""``fastckpt.load``: plan (pure) + execute (torch, C++ engine).

Importing this module imports everything a load needs (torch, the C++ core, the reader), so
that the first load pays for reading bytes, not for imports."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, overload

from fastckpt.config import Config, get_config
from fastckpt.errors import DeviceError, FormatError
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint
from fastckpt.loader.executor import Executor
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.stats import LoadStats, last_stats, record

__all__ = ["LoadPlan", "LoadStats", "last_stats", "load", "plan_load"]

ENGINES = ("auto", "uring", "pread")

DeviceArg = Any  # "cpu" | "cuda" | "cuda:N" | int | torch.device | Mapping[str, device]


def _check_devices(devices: Iterable[str]) -> None:
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            f"cannot load to {cuda[0]}: CUDA is not available in this process "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'"
        )
    count = torch.cuda.device_count()
    for d in cuda:
        idx = int(d.split(":", 1)[1])
        if idx >= count:
            raise DeviceError(f"cannot load to {d}: this process sees {count} CUDA device(s)")


@overload
def load(
    path: str | os.PathLike[str],
    device: DeviceArg = ...,
    *,
    engine: str | None = ...,
    verify: bool = ...,
    names: Iterable[str] | None = ...,
    stats: Literal[False] = ...,
    private_copy: bool | None = ...,
) -> dict[str, Any]: ...


@overload
def load(
    path: str | os.PathLike[str],
    device: DeviceArg = ...,
    *,
    engine: str | None = ...,
    verify: bool = ...,
    names: Iterable[str] | None = ...,
    stats: Literal[True],
    private_copy: bool | None = ...,
) -> tuple[dict[str, Any], LoadStats]: ...


def load(
    path: str | os.PathLike[str],
    device: DeviceArg = "cpu",
    *,
    engine: str | None = None,
    verify: bool = False,
    names: Iterable[str] | None = None,
    stats: bool = False,
    private_copy: bool | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], LoadStats]:
    """Load a checkpoint's tensors onto ``device``.

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file, or a directory of
            (sharded) safetensors files. Stock safetensors are loaded by the same pipeline, with
            no conversion.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int (CUDA index), a ``torch.device``, or
            a device map ``{name prefix: device}`` (tensor-name prefixes on dot boundaries, or
            transformers module names; ``""`` sets the default). Each device's buffers are
            filled in parallel.
        engine: ``"auto"`` (default: config ``io_engine``), ``"uring"`` or ``"pread"``.
        verify: check every chunk checksum inside the pipeline (fastckpt checkpoints only);
            a mismatch raises ``fastckpt.ChecksumError`` and nothing is returned.
        names: load only these tensors (stored or alias names); default all.
        stats: also return a ``LoadStats``.
        private_copy: CPU tensors get memory of their own, read from the file, never a private
            mapping of a page-cached file. A mapping is faster, but a program that later
            rewrites the file in place changes such tensors, and one that truncates it makes
            the process die with SIGBUS on touch (as with safetensors and
            ``torch.load(mmap=True)``; fastckpt's own writer never modifies a published file).
            Default: config ``cpu_map_cached`` (``FASTCKPT_CPU_MAP_CACHED=0`` means a private
            copy). See docs/hardening.md for the measured cost.

    Returns:
        ``{name: tensor}`` in checkpoint order, aliases (tied weights) last and mapped to the very
        tensor object of their target. Tensors of one (partition, device) are views of one
        refcounted buffer: dropping some never frees memory that others use; dropping all frees it.

    Raises:
        FormatError (and subclasses): the checkpoint is invalid or changed during the load.
        ChecksumError: ``verify=True`` found corrupted data.
        DeviceError: the device (map) is unknown or unavailable.
        OSError: an I/O error, with errno and the file name.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(
            f"names={names!r} is a single string; pass a list of tensor names (names=[{names!r}])"
        )
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    overrides: dict[str, Any] = {"io_engine": engine}
    if private_copy is not None:
        overrides["cpu_map_cached"] = not private_copy
    cfg = get_config(**overrides)
    t_start = time.perf_counter()
    # Every file is opened once, beneath the checkpoint directory, and read through those
    # descriptors only: a checkpoint republished meanwhile is never mixed in.
    with open_checkpoint(path) as ck:
        return _load(ck, device, cfg, verify=verify, names=names, stats=stats, t_start=t_start)


def _load(
    ck: OpenCheckpoint,
    device: DeviceArg,
    cfg: Config,
    *,
    verify: bool,
    names: Iterable[str] | None,
    stats: bool,
    t_start: float,
) -> dict[str, Any] | tuple[dict[str, Any], LoadStats]:
    index = ck.index
    if verify and index.checksum_algorithm is None:
        raise FormatError(
            f"verify=True needs chunk checksums, and a {index.kind} checkpoint has none; "
            "convert it with fastckpt.convert to get them",
            path=index.root,
        )
    plan = plan_load(
        index,
        device if not isinstance(device, Mapping) else dict(device),
        names=names,
        chunk_bytes=cfg.ring_slot_bytes,
        verify=verify,
    )
    _check_devices(plan.devices)
    t_plan = time.perf_counter()
    executor = Executor(
        index, plan, engine_kind=cfg.io_engine, verify=verify, cfg=cfg, files=ck.partitions
    )
    tensors = executor.run()
    t_exec = time.perf_counter()
    timings = executor.timings
    timings.add("finalize_s", executor.views_s)

    expected = len(plan.views) + len(plan.aliases)
    if len(tensors) != expected:
        raise RuntimeError(
            f"internal error: delivered {len(tensors)} tensors, the plan has {expected}"
        )
    result = LoadStats(
        path=index.root,
        kind=index.kind,
        devices=plan.devices,
        nbytes=plan.tensor_nbytes,
        read_nbytes=plan.read_nbytes,
        tensors=len(tensors),
        buffers=len(plan.buffers),
        seconds=t_exec - t_start,
        plan_s=t_plan - t_start,
        alloc_s=timings.alloc_s,
        read_wait_s=timings.read_wait_s,
        copy_wait_s=timings.copy_wait_s,
        verify_s=timings.verify_s,
        ring_s=timings.ring_s,
        finalize_s=timings.finalize_s,
        engine=executor.engine_name,
        path_taken="+".join(sorted(timings.paths)) or "none",
        verified_chunks=executor.verifier.checked if executor.verifier else 0,
    )
    record(result)
    return (tensors, result) if stats else tensors
