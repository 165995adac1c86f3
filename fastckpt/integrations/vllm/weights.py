"""Where vLLM's weights come from: ``iter_weights`` (the weight source), plus the checks that
turn a model/checkpoint mismatch into a clear error. Imports no vLLM (torch only when a load
runs), so it is testable without vLLM.

The weight source is ``fastckpt.iter_tensors`` run on the worker's device: windows of tensors in
storage order, one window read ahead while vLLM copies from the one before.

- To a GPU, each window is read through the Loader's pinned staging ring into device memory, and
  vLLM's weight loaders copy device to device; a window is freed once vLLM has copied the last
  tensor in it. Host memory held: the ring, whatever the model's size; extra device memory: at
  most two windows.
- To the CPU, the first tensor is handed over after one window, not after the whole checkpoint;
  page-cached bytes are private mappings (no copy before vLLM's own), others are read straight
  into the window's memory.
- With tensor parallelism, ``boxes`` (from ``shards.learn_boxes``) names the part of each tensor
  this rank keeps: only that is read, and vLLM's loaders get a ``shards.Lazy`` holding it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FastckptError
from fastckpt.integrations.vllm.options import VllmLoadOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index
    from fastckpt.loader.session import Loader
    from fastckpt.loader.shardplan import Box
    from fastckpt.loader.stats import LoadStats


class CheckpointMismatchError(FastckptError, ValueError):
    """The checkpoint's tensors do not fit the model vLLM built (names, shapes or count), or a
    per-rank export was made for another engine configuration."""


def storage_order(index: Index) -> list[tuple[str, str]]:
    """``(name, stored name)`` of every tensor name, in the order ``iter_weights`` yields them
    (storage order; an alias right after its target)."""
    from fastckpt.loader.plan import windows

    out: list[tuple[str, str]] = []
    for group in windows(index, None, 1 << 62):
        for stored, names in group:
            out.extend((name, stored) for name in names)
    return out


def open_loader(options: VllmLoadOptions) -> tuple[Loader, Callable[[], None]]:
    """The Loader a vLLM worker reads through, and how to release it: one configured with the
    ``server`` option when it is set (the node's cache daemon), else the process's default."""
    from fastckpt.loader.api import default_loader
    from fastckpt.loader.session import Loader

    if options.server:
        own = Loader(server=options.server)
        return own, own.close
    return default_loader(), lambda: None


def iter_weights(
    path: str | os.PathLike[str],
    options: VllmLoadOptions,
    *,
    device: str = "cpu",
    boxes: Mapping[str, Box | str | None] | None = None,
    loader: Loader | None = None,
    stats: list[LoadStats] | None = None,
    index: Index | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint at ``path`` on ``device``, in
    storage order, aliases (tied weights) right after their target. ``path`` is a fastckpt
    folder or a safetensors folder.

    Args:
        boxes: per stored name, what this rank keeps (``shards.learn_boxes``): a box (only it is
            read; the name gets a ``shards.Lazy`` holding it), ``shards.SKIP`` (not read; the
            name gets a ``Lazy`` that reads the tensor if it is ever used), or None (whole).
        loader: the Loader to read through (default: per ``options.server``).
        stats: each window's ``LoadStats`` is appended here (bytes read, sources).
        index: the checkpoint's index, when read already.
    """
    from fastckpt.format.reader import read_index
    from fastckpt.loader.stream import iter_tensors
    from fastckpt.rules.urls import is_url

    release: Callable[[], None] = lambda: None  # noqa: E731
    if loader is None:
        loader, release = open_loader(options)
    remote = None
    try:
        if index is None and is_url(path):
            # the download starts here; the windows' opens below join it (one flight)
            remote = loader.open_source(path, convert=False)
            index = remote.index
        elif index is None:
            index = read_index(os.fspath(path))
        wanted = dict(boxes or {})
        skip = {n for n, b in wanted.items() if isinstance(b, str)}
        read_boxes = {n: b for n, b in wanted.items() if isinstance(b, tuple)}
        order = storage_order(index)
        stream = iter_tensors(
            path,
            device,
            names=[n for n, stored in order if stored not in skip],
            boxes=read_boxes or None,
            engine=options.engine,
            index=None if remote is not None else index,
            loader=loader,
            stats=stats,
            verify=options.verify,
        )
        whole = _WholeReader(path, device, loader)
        try:
            yield from _with_stand_ins(order, stream, index, read_boxes, skip, whole.get)
        finally:
            whole.close()
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    finally:
        if remote is not None:
            remote.close()
        release()


def _with_stand_ins(
    order: list[tuple[str, str]],
    stream: Iterator[tuple[str, Any]],
    index: Index,
    boxes: Mapping[str, Box],
    skip: set[str],
    fetch: Callable[[str], Any],
) -> Iterator[tuple[str, Any]]:
    from fastckpt.format import dtypes
    from fastckpt.integrations.vllm.shards import stand_in

    last: tuple[str, Any] | None = None  # (stored name, the stand-in yielded for it)
    for name, stored in order:
        entry = index.tensors[stored]
        if stored in skip:
            if last is None or last[0] != stored:
                dtype = dtypes.torch_dtype(entry.dtype, tensor=stored)
                last = (stored, stand_in(stored, entry.shape, dtype, None, None, fetch))
            yield name, last[1]
            continue
        got_name, tensor = next(stream)
        if got_name != name:
            raise RuntimeError(f"internal error: expected tensor {name!r}, got {got_name!r}")
        box = boxes.get(stored)
        if box is not None:
            if last is None or last[0] != stored:
                dtype = dtypes.torch_dtype(entry.dtype, tensor=stored)
                last = (stored, stand_in(stored, entry.shape, dtype, box, tensor, fetch))
            tensor = last[1]
        yield name, tensor
        del tensor


class _WholeReader:
    """Reads a whole tensor on demand (a stand-in used in a way the probe did not see)."""

    def __init__(self, path: str | os.PathLike[str], device: str, loader: Loader) -> None:
        self._path, self._device, self._loader = path, device, loader
        self._open: Any = None

    def get(self, name: str) -> Any:
        from fastckpt.loader.lazy import open as open_lazy

        if self._open is None:
            self._open = open_lazy(self._path, device=self._device, loader=self._loader)
        return self._open.get_tensor(name)

    def close(self) -> None:
        if self._open is not None:
            with contextlib.suppress(Exception):
                self._open.close()


class WeightsTracker:
    """Wrap a ``(name, tensor)`` iterator and remember what went through it, so a failure inside
    a model's ``load_weights`` can name the tensor it failed on, and a failure of the source
    itself (I/O, format, checksum) is told apart from a mismatch."""

    def __init__(self, weights: Iterable[tuple[str, Any]]) -> None:
        self._weights = iter(weights)
        self.count = 0
        self.last: tuple[str, tuple[int, ...], str] | None = None
        self.source_error: BaseException | None = None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            try:
                name, tensor = next(self._weights)
            except StopIteration:
                return
            except BaseException as e:
                self.source_error = e
                raise
            self.count += 1
            self.last = (name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            yield name, tensor


def load_checked(
    load_weights: Callable[[Iterable[tuple[str, Any]]], Any],
    weights: Iterable[tuple[str, Any]],
    *,
    expected: set[str] | None,
    checkpoint: str,
    model: str,
) -> None:
    """Feed ``weights`` to a model's ``load_weights`` and check the result.

    Args:
        load_weights: the model's ``load_weights(iterable)``; vLLM models return the set of
            parameter names they filled (older ones return None: then only errors are checked).
        weights: the ``(name, tensor)`` source.
        expected: parameter names the model needs filled, or None to skip that check (for
            example for quantized models, whose parameters are not one-to-one with tensors).
        checkpoint, model: named in error messages.

    Raises:
        CheckpointMismatchError: the model rejected a tensor (unknown name, wrong shape), the
            checkpoint held no tensors, or parameters were left unfilled.
        Errors of the source itself (``FormatError``, ``ChecksumError``, ``OSError``) unchanged.
    """
    tracker = WeightsTracker(weights)
    try:
        loaded = load_weights(tracker)
    except Exception as e:
        if tracker.source_error is e or isinstance(e, FastckptError):
            raise
        if tracker.last is None:
            where = "before the first tensor"
        else:
            name, shape, dtype = tracker.last
            where = f"at tensor {name!r} (shape {list(shape)}, {dtype}; tensor {tracker.count})"
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} does not match model {model}: its load_weights failed "
            f"{where}: {type(e).__name__}: {e}"
        ) from e
    if tracker.count == 0:
        raise CheckpointMismatchError(f"checkpoint {checkpoint} holds no tensors for model {model}")
    if expected is not None and loaded is not None:
        missing = sorted(expected - set(loaded))
        if missing:
            shown = ", ".join(missing[:8])
            if len(missing) > 8:
                shown += f", ... ({len(missing)} in all)"
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint} does not match model {model}: {len(missing)} "
                f"parameter(s) were not in it: {shown}"
            )
