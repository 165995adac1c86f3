"""``fastckpt.load``: plan (pure) + execute (torch, C++ engine).

Importing this module imports everything a load needs (torch, the C++ core, the reader), so
that the first load pays for reading bytes, not for imports."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Literal, overload

from fastckpt.format.index import Index
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.session import Loader, default_loader
from fastckpt.loader.stats import LoadStats, last_stats

__all__ = ["LoadPlan", "LoadStats", "Loader", "last_stats", "load", "plan_load"]

DeviceArg = Any  # "cpu" | "cuda" | "cuda:N" | int | torch.device | Mapping[str, device]


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
    loader: Loader | None = ...,
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
    index: Index | None = ...,
    stats: Literal[True],
    loader: Loader | None = ...,
    private_copy: bool | None = ...,
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
    loader: Loader | None = None,
    private_copy: bool | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], LoadStats]:
    """Load a checkpoint's tensors onto ``device``.

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file, or a directory of
            (sharded) safetensors files. Stock safetensors are loaded by the same pipeline, with
            no conversion (unless the SSD tier is on: then a converted copy is kept and used).
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
        loader: the ``fastckpt.Loader`` to load through (its engines, pool, tiers and
            settings); default: the current one (``Loader.use()``) or the process's default.
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
    session = loader if loader is not None else default_loader()
    return session.load(
        index if index is not None else path,
        device,
        engine=engine,
        verify=verify,
        names=names,
        stats=stats,
        private_copy=private_copy,
    )
