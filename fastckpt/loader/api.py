"""``fastckpt.load``: plan (pure) + execute (torch, C++ engine).

Importing this module imports everything a load needs (torch, the C++ core, the reader), so
that the first load pays for reading bytes, not for imports."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, overload

from fastckpt.config import get_config
from fastckpt.errors import DeviceError, FormatError
from fastckpt.format.index import Index
from fastckpt.format.reader import read_index
from fastckpt.loader.executor import Executor
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.stats import LoadStats, last_stats, record

__all__ = ["LoadPlan", "LoadStats", "last_stats", "load", "plan_load"]

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
    index: Index | None = ...,
    stats: Literal[False] = ...,
) -> dict[str, Any]: ...


@overload
def load(
    path: str | os.PathLike[str],
    device: DeviceArg = ...,
    *,
    engine: str | None = ...,
    verify: bool = ...,
    names: Iterable[str] | None = ...,
    index: Index | None = ...,
    stats: Literal[True],
) -> tuple[dict[str, Any], LoadStats]: ...


def load(
    path: str | os.PathLike[str],
    device: DeviceArg = "cpu",
    *,
    engine: str | None = None,
    verify: bool = False,
    names: Iterable[str] | None = None,
    index: Index | None = None,
    stats: bool = False,
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
        index: the checkpoint's index when the caller has read it already
            (``fastckpt.read_index(path)``), so that it is not read twice.
        stats: also return a ``LoadStats``.

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
    cfg = get_config(io_engine=engine)
    t_start = time.perf_counter()
    if index is None:
        index = read_index(path)
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
    executor = Executor(index, plan, engine_kind=cfg.io_engine, verify=verify, cfg=cfg)
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
