"""Where vLLM's weights come from: one small function, ``iter_weights``, plus the checks that turn
a model/checkpoint mismatch into a clear error. Imports no vLLM (torch only when a load runs), so
it is testable without vLLM.

``iter_weights`` is the seam for other weight sources: today it loads the whole checkpoint with
``fastckpt.load`` (one pipeline pass, whole buffers) and hands the tensors out in storage order;
a storage-order streaming iterator or a fastckpt Loader/daemon replaces its body without
touching the vLLM side.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FastckptError
from fastckpt.integrations.vllm.options import VllmLoadOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch


class CheckpointMismatchError(FastckptError, ValueError):
    """The checkpoint's tensors do not fit the model vLLM built (names, shapes or count)."""


def iter_weights(
    path: str | os.PathLike[str], options: VllmLoadOptions
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, CPU tensor)`` for every tensor of the checkpoint at ``path``, in storage
    order, aliases (tied weights) last. ``path`` is a fastckpt folder or a safetensors folder.

    The whole checkpoint is read by one ``fastckpt.load`` before the first tensor is yielded:
    on CPU the tensors of a page-cached file are views of a private mapping (no copy until vLLM
    copies them into its parameters); on a cold file the pipeline reads at full depth. Each
    yielded tensor is dropped from the result as it goes, so a buffer is freed as soon as vLLM
    has copied the last tensor that lives in it.
    """
    from fastckpt.loader.api import load
    from fastckpt.loader.session import Loader

    # with a daemon named, a Loader configured with it (it asks the daemon first)
    loader = Loader(server=options.server) if options.server else None
    tensors = load(path, "cpu", engine=options.engine, verify=options.verify, loader=loader)
    while tensors:
        name = next(iter(tensors))
        yield name, tensors.pop(name)


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
