"""``fastckpt.iter_tensors``: ``(name, tensor)`` in storage order, with bounded host memory.

For consumers that take weights one at a time (a serving engine's ``load_weights(iterable)``,
a quantizer, a converter)::

    for name, tensor in fastckpt.iter_tensors("/models/llama.fastckpt", device="cuda:0"):
        model.load_weight(name, tensor)

Reads are pipelined like :func:`fastckpt.load`: while the consumer works on one tensor, the I/O
engine is already reading the next ones, up to ``window_bytes`` ahead.

- To the CPU, each tensor is read straight into its own memory (no staging copy); the host
  memory in use is what the consumer keeps, plus at most ``window_bytes`` (and at least the
  tensor being read) in flight.
- To a GPU, bytes go through a small ring of pinned host buffers (``window_bytes`` in
  ``ring_slot_bytes`` slots) into the tensor's GPU memory, copies on a side stream overlapping
  the next reads. Host memory is the ring, whatever the model's size. A yielded tensor is ready
  to use on the current stream.

Each tensor is yielded once, in the order its bytes are stored (partition, then offset); an
alias (a tied weight stored once in a fastckpt checkpoint) is yielded right after its target,
as the same tensor object. The index is validated as for ``load``; a file that is shorter than
its index raises when it is read. No chunk checksums are checked (use ``fastckpt.verify``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastckpt.config import get_config
from fastckpt.errors import DeviceError, TruncatedError
from fastckpt.format import dtypes
from fastckpt.format.reader import read_index
from fastckpt.loader.plan import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index, TensorEntry

__all__ = ["iter_tensors"]


@dataclass
class _Item:
    """One stored tensor on its way out: the aliases that follow it, its memory once made."""

    entry: TensorEntry
    own: bool  # its own name was asked for (else only aliases of it)
    aliases: list[str]
    dest: Any = None  # uint8 tensor of entry.nbytes on the target device, once made


def iter_tensors(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    names: Iterable[str] | None = None,
    window_bytes: int | None = None,
    engine: str | None = None,
    index: Index | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in storage order (see the module docstring).

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file or a directory of
            (sharded) safetensors files.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or an int (one device).
        names: only these tensors (stored or alias names), still in storage order.
        window_bytes: how far reads run ahead of the consumer (default: 4 ring slots, 128 MiB
            with the default config); on a GPU, also the pinned ring's size.
        engine: ``"auto"`` (default: config ``io_engine``), ``"uring"`` or ``"pread"``.
        index: the checkpoint's index when read already.

    Raises:
        FormatError (and subclasses): the checkpoint is invalid (before the first tensor) or a
            file is shorter than its index (when it is read).
        DeviceError: the device is unknown or unavailable. KeyError: an unknown name.
    """
    cfg = get_config(io_engine=engine)
    if index is None:
        index = read_index(path)
    dev = resolve_device(device if isinstance(device, (int, str)) else str(device))
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"cannot stream to {dev}: CUDA is not available in this process")
        if int(dev.split(":", 1)[1]) >= torch.cuda.device_count():
            raise DeviceError(
                f"cannot stream to {dev}: this process sees {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    slot = cfg.ring_slot_bytes
    window = 4 * slot if window_bytes is None else int(window_bytes)
    if window <= 0:
        raise ValueError(f"window_bytes={window_bytes}: must be positive")
    items = _items(index, names)
    return (
        _cpu(index, items, window, slot, cfg.io_engine)
        if dev == "cpu"
        else _gpu(index, items, dev, window, slot, cfg.io_engine)
    )


def _items(index: Index, names: Iterable[str] | None) -> list[_Item]:
    wanted: set[str] | None = None
    if names is not None:
        wanted = set()
        for name in names:
            if name not in index.tensors and name not in index.aliases:
                raise KeyError(f"no tensor {name!r} in {index.root}")
            wanted.add(name)
    aliases: dict[str, list[str]] = {}
    for alias, target in index.aliases.items():
        if wanted is None or alias in wanted:
            aliases.setdefault(target, []).append(alias)
    out: list[_Item] = []
    for name, entry in index.tensors.items():
        own = wanted is None or name in wanted
        if own or name in aliases:
            out.append(_Item(entry, own, aliases.get(name, [])))
    return out


def _deliver(item: _Item, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    entry = item.entry
    dtype = dtypes.torch_dtype(entry.dtype, path=path, tensor=entry.name)
    tensor = item.dest.view(dtype).reshape(entry.shape)
    item.dest = None  # the consumer holds the only reference from here
    if item.own:
        yield entry.name, tensor
    for alias in item.aliases:
        yield alias, tensor


def _submit(eng: Any, reads: list[Any], index: Index, entry: TensorEntry) -> Any:
    try:
        return eng.submit(reads)
    except ValueError as exc:  # the engine found a range past the file's end
        raise TruncatedError(
            f"the file no longer holds the tensor's bytes (changed since its index was read): "
            f"{exc}",
            path=index.partitions[entry.partition].path,
            tensor=entry.name,
        ) from exc


def _pieces(nbytes: int, slot: int) -> list[tuple[int, int]]:
    return [(off, min(slot, nbytes - off)) for off in range(0, nbytes, slot)]


def _cpu(
    index: Index, items: list[_Item], window: int, slot: int, kind: str
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    from fastckpt import io_engine

    files: dict[int, io_engine.File] = {}
    inflight: deque[tuple[_Item, Any]] = deque()
    ahead = 0
    todo = deque(items)
    with io_engine.Engine(kind) as eng:
        try:
            while todo or inflight:
                while todo and (not inflight or ahead + todo[0].entry.nbytes <= window):
                    item = todo.popleft()
                    entry = item.entry
                    dest = torch.empty(entry.nbytes, dtype=torch.uint8)
                    batch = None
                    if entry.nbytes:
                        file = files.get(entry.partition)
                        if file is None:
                            part = index.partitions[entry.partition]
                            file = files[entry.partition] = io_engine.File(part.path)
                        arr = dest.numpy()
                        reads = [
                            (file, entry.offset + off, n, arr, off, i)
                            for i, (off, n) in enumerate(_pieces(entry.nbytes, slot))
                        ]
                        batch = _submit(eng, reads, index, entry)
                    item.dest = dest
                    inflight.append((item, batch))
                    ahead += entry.nbytes
                item, batch = inflight.popleft()
                if batch is not None:
                    batch.wait_all()
                ahead -= item.entry.nbytes
                yield from _deliver(item, index.root)
        finally:
            for _, batch in inflight:
                if batch is not None:
                    batch.cancel()
            for file in files.values():
                file.close()


def _gpu(
    index: Index, items: list[_Item], device: str, window: int, slot: int, kind: str
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    from fastckpt import io_engine

    nslots = max(2, window // slot)
    ring = [torch.empty(slot, dtype=torch.uint8, pin_memory=True) for _ in range(nslots)]
    events: list[Any] = [None] * nslots
    free = deque(range(nslots))
    stream = torch.cuda.Stream(device=device)
    files: dict[int, io_engine.File] = {}
    # (item, piece offset, piece bytes, last piece of the item?) in storage order
    work: deque[tuple[_Item, int, int, bool]] = deque()
    for item in items:
        pieces = _pieces(item.entry.nbytes, slot) or [(0, 0)]
        for i, (off, n) in enumerate(pieces):
            work.append((item, off, n, i == len(pieces) - 1))
    reading: deque[tuple[_Item, int, int, bool, int, Any]] = deque()
    with io_engine.Engine(kind) as eng:
        try:
            while work or reading:
                while work and free:
                    item, off, n, last = work.popleft()
                    if item.dest is None:
                        item.dest = torch.empty(item.entry.nbytes, dtype=torch.uint8, device=device)
                    s = free.popleft()
                    if events[s] is not None:
                        events[s].synchronize()  # its previous copy has left the slot
                    batch = None
                    if n:
                        entry = item.entry
                        file = files.get(entry.partition)
                        if file is None:
                            part = index.partitions[entry.partition]
                            file = files[entry.partition] = io_engine.File(part.path)
                        batch = eng.submit([(file, entry.offset + off, n, ring[s].numpy(), 0, s)])
                    reading.append((item, off, n, last, s, batch))
                item, off, n, last, s, batch = reading.popleft()
                if batch is not None:
                    batch.wait_all()
                raw = item.dest
                with torch.cuda.stream(stream):
                    if n:
                        raw[off : off + n].copy_(ring[s][:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                events[s] = event
                free.append(s)
                if last:
                    torch.cuda.current_stream(device).wait_event(event)
                    raw.record_stream(stream)  # written on the side stream
                    yield from _deliver(item, index.root)
        finally:
            for pending in reading:
                if pending[5] is not None:
                    pending[5].cancel()
            for file in files.values():
                file.close()
            stream.synchronize()
