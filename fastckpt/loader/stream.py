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
object. The index is validated as for ``load``. Chunk checksums are checked with ``verify=True``
(each window then reads the whole checksum chunks its tensors touch).

``boxes`` reads only a sub-array of some tensors (a tensor-parallel rank's share): each window is
then planned by ``shardplan.plan_shards`` (a row shard is one range of the file, a column shard
its row segments or, where the policy's ``gather_runs`` finds one read cheaper, the span they lie
in), and the tensor yielded has the box's shape.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index
    from fastckpt.loader.opening import Opened
    from fastckpt.loader.session import Loader
    from fastckpt.loader.shardplan import Box
    from fastckpt.loader.stats import LoadStats

__all__ = ["iter_tensors"]


def iter_tensors(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    names: Iterable[str] | None = None,
    boxes: Mapping[str, Box | None] | None = None,
    window_bytes: int | None = None,
    engine: str | None = None,
    index: Index | None = None,
    loader: Loader | None = None,
    stats: list[LoadStats] | None = None,
    verify: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in storage order (see the module docstring).

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file or a directory of
            (sharded) safetensors files.
        device: ``"cpu"``, ``"cuda"`` (the current device), ``"cuda:N"`` or an int (one
            device).
        names: only these tensors (stored or alias names), still in storage order.
        boxes: stored name -> the sub-array to read of it (one ``(lo, hi)`` per dimension;
            None: all of it); the tensor yielded for that name (and its aliases) has the box's
            shape. Tensors not named here are read whole.
        window_bytes: bytes of tensors per window (default: 4 ring slots, 128 MiB with the
            default config). Reads run one window ahead of the consumer.
        engine: ``"auto"`` (default: config ``io_engine``), ``"uring"`` or ``"pread"``.
        index: the checkpoint's index when read already (its files are opened and checked
            against it again).
        loader: the ``fastckpt.Loader`` to read through (default: the current or default one).
        stats: a list each window's ``LoadStats`` is appended to (bytes read, sources, times).
        verify: check the chunk checksums of every byte yielded (each window reads the whole
            checksum chunks its tensors touch; a fastckpt checkpoint only; not with ``boxes``).

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
    if verify and boxes is not None:
        raise ValueError(
            "verify=True checks whole checksum chunks; it cannot be combined with boxes"
        )
    opened = session.open_source(
        index if index is not None else path, cfg=cfg, convert=False, verify=verify
    )
    try:
        if verify and opened.index.checksum_algorithm is None:
            raise FormatError(
                f"verify=True needs chunk checksums, and a {opened.index.kind} checkpoint has "
                "none; convert it with fastckpt.convert to get them",
                path=opened.index.root,
            )
        shards = None
        if boxes is not None:
            for name in boxes:
                if name not in opened.index.tensors:
                    raise KeyError(f"boxes: {name!r} is not a stored tensor of {opened.index.root}")
            shards = _Shards(boxes, session.read_gbps(opened, cfg), dev != "cpu")
        groups = windows(opened.index, names, window, boxes=boxes)
    except BaseException:
        opened.close()
        raise
    return _run(session, opened, dev, groups, cfg, shards, stats, verify)


class _Shards:
    """What a window of a sharded read needs: the boxes, and whether a column shard reads its
    runs or its span (``policy.gather_runs`` at the rate the checkpoint's reads can expect)."""

    def __init__(self, boxes: Mapping[str, Box | None], gbps: float, device: bool) -> None:
        self.boxes = boxes
        self.gbps = gbps
        self.device = device

    def gather(self, runs: int, kept: int, span: int) -> bool:
        from fastckpt.loader.policy import gather_runs

        return gather_runs(runs, kept, span, device=self.device, gbps=self.gbps)


def _run(
    loader: Loader,
    opened: Opened,
    device: str,
    groups: list[list[tuple[str, list[str]]]],
    cfg: Any,
    shards: _Shards | None = None,
    stats: list[LoadStats] | None = None,
    verify: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    ahead: _Ahead | None = None

    def start(group: list[tuple[str, list[str]]]) -> _Ahead:
        return _Ahead(loader, opened, device, group, cfg, shards, stats, verify)

    try:
        if groups:
            ahead = start(groups[0])
        for i in range(len(groups)):
            tensors = ahead.result() if ahead is not None else {}
            ahead = start(groups[i + 1]) if i + 1 < len(groups) else None
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
        shards: _Shards | None = None,
        stats: list[LoadStats] | None = None,
        verify: bool = False,
    ) -> None:
        self._out: dict[str, Any] = {}
        self._error: BaseException | None = None
        names = [stored for stored, _ in group]

        def work() -> None:
            try:
                plan = None
                if shards is not None:
                    from fastckpt.loader.shardplan import plan_shards

                    plan = plan_shards(
                        opened.index,
                        {n: shards.boxes.get(n) for n in names},
                        device,
                        chunk_bytes=cfg.ring_slot_bytes,
                        gather=shards.gather,
                    )
                tensors, result = loader.execute(
                    opened, device, names=names, cfg=cfg, tiers=False, plan=plan, verify=verify
                )
                if stats is not None:
                    stats.append(result)
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
