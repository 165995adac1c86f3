"""``fastckpt.iter_tensors``: ``(name, tensor)`` in storage order, with bounded memory.

For consumers that take weights one at a time (a serving engine's ``load_weights(iterable)``,
a quantizer, a converter)::

    for name, tensor in fastckpt.iter_tensors("/models/llama.fastckpt", device="cuda:0"):
        model.load_weight(name, tensor)

It is the load core run in windows: the tensors, in the order their bytes are stored, are cut
into windows of at most ``window_bytes`` (a tensor larger than that is a window of its own); each
window is one plan, one policy decision and one executor run, so every rule of ``fastckpt.load``
holds (validated descriptors only, bool bytes checked, the cache daemon's copy when one is set, the
pinned staging ring for a GPU). While the consumer works on one window, the next one is already
being read.

- To the CPU, page-cached bytes are mapped copy-on-write (no copy), others read straight into
  their final memory; memory in use is what the consumer keeps plus at most two windows.
- To a GPU, bytes go through the Loader's pinned staging ring into device memory; host memory is
  the ring, whatever the model's size; device memory is what the consumer keeps plus at most two
  windows. A yielded tensor is ready to use on the current stream.

Each tensor is yielded once, in storage order (partition, then offset); an alias (a tied weight
stored once in a fastckpt checkpoint) is yielded right after its target, as the same tensor
object. The index is validated as for ``load``. No chunk checksums are checked (use
``fastckpt.verify`` or ``fastckpt.load(verify=True)``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index
    from fastckpt.loader.opening import Opened
    from fastckpt.loader.session import Loader

__all__ = ["iter_tensors"]


def iter_tensors(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    names: Iterable[str] | None = None,
    window_bytes: int | None = None,
    engine: str | None = None,
    index: Index | None = None,
    loader: Loader | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in storage order (see the module docstring).

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file or a directory of
            (sharded) safetensors files.
        device: ``"cpu"``, ``"cuda"`` (the current device), ``"cuda:N"`` or an int (one
            device).
        names: only these tensors (stored or alias names), still in storage order.
        window_bytes: bytes of tensors per window (default: 4 ring slots, 128 MiB with the
            default config). Reads run one window ahead of the consumer.
        engine: ``"auto"`` (default: config ``io_engine``), ``"uring"`` or ``"pread"``.
        index: the checkpoint's index when read already (its files are opened and checked
            against it again).
        loader: the ``fastckpt.Loader`` to read through (default: the current or default one).

    Raises:
        FormatError (and subclasses): the checkpoint is invalid (before the first tensor) or a
            file changed (when it is read).
        DeviceError: the device is unknown or unavailable. KeyError: an unknown name.
    """
    from fastckpt.loader.api import default_loader
    from fastckpt.loader.plan import windows
    from fastckpt.loader.target import check_single_device

    session = loader if loader is not None else default_loader()
    cfg = session.config(io_engine=engine)
    dev = check_single_device(session, device, "stream to")
    window = 4 * cfg.ring_slot_bytes if window_bytes is None else int(window_bytes)
    if window <= 0:
        raise ValueError(f"window_bytes={window_bytes}: must be positive")
    opened = session.open_source(index if index is not None else path, cfg=cfg, convert=False)
    try:
        groups = windows(opened.index, names, window)
    except BaseException:
        opened.close()
        raise
    return _run(session, opened, dev, groups, cfg)


def _run(
    loader: Loader,
    opened: Opened,
    device: str,
    groups: list[list[tuple[str, list[str]]]],
    cfg: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    ahead: _Ahead | None = None
    try:
        if groups:
            ahead = _Ahead(loader, opened, device, groups[0], cfg)
        for i in range(len(groups)):
            tensors = ahead.result() if ahead is not None else {}
            ahead = (
                _Ahead(loader, opened, device, groups[i + 1], cfg) if i + 1 < len(groups) else None
            )
            for stored, yields in groups[i]:
                tensor = tensors.pop(stored)
                for name in yields:
                    yield name, tensor
                del tensor
    finally:
        if ahead is not None:
            ahead.wait()
        opened.close()


class _Ahead:
    """One window read on a background thread (so the consumer overlaps the next read)."""

    def __init__(
        self,
        loader: Loader,
        opened: Opened,
        device: str,
        group: list[tuple[str, list[str]]],
        cfg: Any,
    ) -> None:
        self._out: dict[str, Any] = {}
        self._error: BaseException | None = None
        names = [stored for stored, _ in group]

        def work() -> None:
            try:
                tensors, _ = loader.execute(opened, device, names=names, cfg=cfg, tiers=False)
                self._out = {n: tensors[n] for n in names}
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=work, name="fastckpt-iter", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        out, self._out = self._out, {}
        return out
