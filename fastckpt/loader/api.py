"""``fastckpt.load`` and the process's Loaders: the default one, the current one.

Importing this module imports everything a load needs (torch, the C++ core, the reader), so
that the first load pays for reading bytes, not for imports."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal, overload

from fastckpt.format.index import Index
from fastckpt.loader.plan import LoadPlan, plan_load
from fastckpt.loader.session import Loader, _current
from fastckpt.loader.stats import LoadStats, last_stats
from fastckpt.loader.target import resolve_target

__all__ = [
    "LoadPlan",
    "LoadStats",
    "Loader",
    "default_loader",
    "last_stats",
    "load",
    "load_via_server",
    "peek_default",
    "plan_load",
    "set_default_loader",
]

DeviceArg = Any  # "cpu" | "cuda" | "cuda:N" | int | torch.device | Mapping[str, device]

_default: Loader | None = None
_default_lock = threading.Lock()


def default_loader() -> Loader:
    """The Loader ``fastckpt.load`` uses: the one made current with ``Loader.use()``, else the
    process-wide default (made on first use from the configuration; made again if it was
    closed)."""
    global _default
    current = _current.get()
    if current is not None:
        return current
    with _default_lock:
        if _default is None or _default.closed:
            _default = Loader()
        return _default


def peek_default() -> Loader | None:
    return _default


def set_default_loader(loader: Loader | None) -> Loader | None:
    """Replace the process-wide default Loader (None: make a fresh one on next use); returns the
    previous one (not closed)."""
    global _default
    with _default_lock:
        old, _default = _default, loader
    return old


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
        device: ``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"``, an int (CUDA
            index), a ``torch.device``, or a device map ``{name prefix: device}`` (tensor-name
            prefixes on dot boundaries, or transformers module names; ``""`` sets the default).
            Each device's buffers are filled in parallel.
        engine: ``"auto"`` (default: config ``io_engine``), ``"uring"`` or ``"pread"``.
        verify: check every chunk checksum inside the pipeline (fastckpt checkpoints only),
            on the bytes the tensors are made of; a mismatch raises ``fastckpt.ChecksumError``
            and nothing is returned.
        names: load only these tensors (stored or alias names); default all.
        index: the checkpoint's index when the caller has read it already
            (``fastckpt.read_index(path)``), so that it is not read twice (its files are opened
            and checked against it again).
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
        Device tensors are ready to use on the caller's current CUDA stream.

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


def load_via_server(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    names_: Sequence[str] | None = None,
    verify: bool = False,
    stats: bool = False,
    server: str | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Load through the cache daemon only: ``{name: tensor}`` (with a ``LoadStats`` when
    ``stats``), or None when the daemon does not serve this checkpoint (a load through a Loader
    with a server set would then read the files). For tools and tests that must know which path
    was taken; ``fastckpt.load`` does this, and falls back, by itself."""

    settings: dict[str, Any] = {}
    if server is not None:
        settings["server"] = server
    if timeout_s is not None:
        settings["server_timeout_s"] = timeout_s
    with Loader(**settings) as loader:
        cfg = loader.config()
        if not cfg.server:
            return None
        with loader.open_source(path, cfg=cfg, convert=False, verify=verify) as opened:
            if not opened.daemon:
                return None
            tensors, result = loader.execute(
                opened, resolve_target(device), names=names_, verify=verify, cfg=cfg, tiers=False
            )
    return (tensors, result) if stats else tensors
