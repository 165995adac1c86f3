"""``fastckpt.open``: lazy, per-tensor access in the shape of ``safetensors.safe_open``.

    with fastckpt.open("model.safetensors", device="cpu") as f:   # or a fastckpt checkpoint
        for name in f.keys():
            t = f.get_tensor(name)
        rows = f.get_slice("embed.weight")[100:200]                # reads those rows only

It works on whatever :func:`fastckpt.load` reads (a fastckpt checkpoint directory, one
``.safetensors`` file, a sharded safetensors directory), through the same core: the checkpoint is
opened once, its index fully checked (bounds, overlaps, dtypes, partition sizes) before the first
tensor, and every tensor is read by the load executor through the descriptors that were
validated (a partition replaced or republished after ``open`` is never read; bool bytes other
than 0/1 are refused), from the cache daemon's copy when one is configured, and straight to the
device through the pinned staging ring for a GPU.

A slice reads the bounding box of the selection, as contiguous runs of the file, and selects in
memory: ``x[10:20]`` reads 10 rows, ``x[:, 3]`` reads one element per row when the rows are long
and the whole span when that costs at most twice the bytes (one read instead of many).

Differences from ``safetensors.safe_open`` (see docs/lazy.md):

- ``framework`` may only be ``"pt"`` (torch); it may be omitted.
- ``keys()`` also lists alias names of a fastckpt checkpoint (tied weights stored once); their
  ``get_tensor`` returns the target's values.
- an unknown name raises ``KeyError`` (safetensors raises its own ``SafetensorError``); a file
  that does not match its index raises a :class:`fastckpt.FormatError`.
- ``metadata()`` of a fastckpt checkpoint is the metadata recorded at conversion (the source's
  ``__metadata__``), ``None`` when there is none.
- no chunk checksums are checked (a slice reads less than a checksum chunk); use
  ``fastckpt.verify`` or ``fastckpt.load(verify=True)`` for that.
- it reads into memory of its own instead of mapping the file, so tensors never depend on the
  file staying unchanged after they are returned.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fastckpt.format import dtypes
from fastckpt.loader.plan import plan_gather
from fastckpt.loader.shardplan import box_runs, split_dim

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index, TensorEntry
    from fastckpt.loader.opening import Opened
    from fastckpt.loader.session import Loader

__all__ = ["LazyCheckpoint", "TensorSlice", "open"]

# A slice whose runs are short reads the enclosing span instead when that costs at most this
# factor in bytes, or when it would otherwise take more than _MAX_RUNS reads.
_WIDEN_FACTOR = 2
_MAX_RUNS = 65536


def open(
    path: str | os.PathLike[str],
    framework: str = "pt",
    device: Any = "cpu",
    *,
    loader: Loader | None = None,
) -> LazyCheckpoint:
    """Open a checkpoint for lazy access (a context manager; see the module docstring).

    Args:
        path: a fastckpt checkpoint directory, a ``.safetensors`` file or a directory of
            (sharded) safetensors files.
        framework: ``"pt"`` (the only one; accepted so that ``safe_open(path, "pt")`` calls
            work unchanged).
        device: where tensors are returned: ``"cpu"``, ``"cuda"`` (the current device),
            ``"cuda:N"`` or an int.
        loader: the ``fastckpt.Loader`` to read through (default: the current or default one).

    Raises:
        FormatError (and subclasses): the checkpoint is invalid.
        DeviceError: the device is unknown or unavailable.
        ValueError: another framework.
        FileNotFoundError: no such checkpoint.
    """
    from fastckpt.loader.api import default_loader
    from fastckpt.loader.target import check_single_device

    if framework not in ("pt", "torch"):
        raise ValueError(f"framework={framework!r}: fastckpt.open returns torch tensors ('pt')")
    session = loader if loader is not None else default_loader()
    dev = check_single_device(session, device, "open for")
    cfg = session.config(cpu_map_cached=False)
    return LazyCheckpoint(session, session.open_source(path, cfg=cfg, convert=False), dev)


class LazyCheckpoint:
    """An open checkpoint; tensors are read when asked for. Close it (or use ``with``)."""

    def __init__(self, loader: Loader, opened: Opened, device: str) -> None:
        self._loader = loader
        self._opened = opened
        self._index = opened.index
        self._device = device
        self._closed = False
        self.bytes_read = 0
        """Bytes read from the files so far (what slices cost)."""

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (idempotent); later calls raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            self._opened.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # -- what is in it ----------------------------------------------------------------------

    @property
    def index(self) -> Index:
        """The validated index."""
        return self._index

    def keys(self) -> list[str]:
        """Every tensor name, sorted (stored names and aliases)."""
        self._check_open()
        return sorted(self._index.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (
            name in self._index.tensors or name in self._index.aliases
        )

    def metadata(self) -> dict[str, str] | None:
        """The checkpoint's string metadata (safetensors ``__metadata__``), or None."""
        self._check_open()
        return dict(self._index.metadata) or None

    # -- reading ----------------------------------------------------------------------------

    def get_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` on the device."""
        entry = self._entry(name)
        return self._read_box(entry, [(0, n) for n in entry.shape])

    def get_slice(self, name: str) -> TensorSlice:
        """A handle whose ``[...]`` reads only what the selection needs."""
        return TensorSlice(self, name, self._entry(name))

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the checkpoint is closed")

    def _entry(self, name: str) -> TensorEntry:
        self._check_open()
        try:
            return self._index.entry(name)
        except KeyError:
            raise KeyError(
                f"no tensor {name!r} in {self._index.root} ({len(self._index.tensors)} tensors)"
            ) from None

    def _read_box(self, entry: TensorEntry, box: list[tuple[int, int]]) -> torch.Tensor:
        """The sub-array ``box`` (a (lo, hi) per dim) of ``entry``, read by the load core."""
        itemsize = dtypes.get(entry.dtype).itemsize
        shape = list(entry.shape)
        box_shape = tuple(hi - lo for lo, hi in box)
        nbytes = math.prod(box_shape) * itemsize
        runs = box_runs(shape, box, itemsize) if nbytes else []
        cfg = self._loader.config(cpu_map_cached=False)
        plan = plan_gather(entry, runs, box_shape, self._device, chunk_bytes=cfg.ring_slot_bytes)
        tensors, _ = self._loader.execute(
            self._opened, self._device, cfg=cfg, tiers=False, plan=plan
        )
        self.bytes_read += plan.read_nbytes
        return tensors[entry.name]


class TensorSlice:
    """``get_slice(name)``: shape and dtype without reading; ``[...]`` reads the selection."""

    def __init__(self, owner: LazyCheckpoint, name: str, entry: TensorEntry) -> None:
        self._owner = owner
        self._name = name
        self._entry = entry

    def get_shape(self) -> list[int]:
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        """The safetensors dtype code (``"F32"``, ``"BF16"``, ...) as ``safe_open`` gives it."""
        code = dtypes.get(self._entry.dtype).safetensors
        return code if code is not None else self._entry.dtype

    def __getitem__(self, key: Any) -> torch.Tensor:
        import torch

        owner = self._owner
        owner._check_open()
        shape = list(self._entry.shape)
        dims = _normalise_key(key, shape)
        want: list[tuple[int, int]] = []
        picks: list[tuple[int, int, int] | int] = []  # (start, stop, step) or an int
        for size, sel in zip(shape, dims, strict=True):
            if isinstance(sel, int):
                want.append((sel, sel + 1))
                picks.append(sel)
                continue
            start, stop, step = sel.indices(size)
            count = len(range(start, stop, step))
            if count == 0:
                want.append((0, 0))
                picks.append((0, 0, 1))
                continue
            last = start + (count - 1) * step
            want.append((start, last + 1))
            picks.append((start, last + 1, step))
        box = _widen(shape, want, dtypes.get(self._entry.dtype).itemsize)
        local: list[Any] = []
        for (lo, _), pick in zip(box, picks, strict=True):
            if isinstance(pick, int):
                local.append(pick - lo)
            else:
                local.append(slice(pick[0] - lo, pick[1] - lo, pick[2]))
        block = owner._read_box(self._entry, box)
        result = block[tuple(local)]
        if result.numel() != block.numel() or result.stride() != _strides(result.shape):
            # a copy with plain strides, that does not keep the rest of the box alive
            result = result.clone(memory_format=torch.contiguous_format)
        return result


def _strides(shape: Any) -> tuple[int, ...]:
    out: list[int] = []
    step = 1
    for n in reversed(tuple(shape)):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _normalise_key(key: Any, shape: list[int]) -> list[int | slice]:
    """One int (non-negative, checked) or slice per dimension, as torch indexing reads ``key``."""
    items = list(key) if isinstance(key, tuple) else [key]
    if sum(1 for k in items if k is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    explicit = sum(1 for k in items if k is not Ellipsis)
    if explicit > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - explicit)
    items += [slice(None)] * (len(shape) - len(items))
    out: list[int | slice] = []
    for dim, (size, item) in enumerate(zip(shape, items, strict=True)):
        if isinstance(item, slice):
            for part in (item.start, item.stop, item.step):
                if part is not None and not _is_int(part):
                    raise TypeError(f"slice bounds must be integers, not {type(part).__name__}")
            if item.step is not None and int(item.step) <= 0:
                raise ValueError("step must be greater than zero")
            out.append(item)
        elif _is_int(item):
            i = int(item)
            if not -size <= i < size:
                raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {size}")
            out.append(i + size if i < 0 else i)
        else:
            raise TypeError(
                f"fastckpt slices take integers, slices and '...', not {type(item).__name__}"
            )
    return out


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__")


def _widen(shape: list[int], box: list[tuple[int, int]], itemsize: int) -> list[tuple[int, int]]:
    """``box``, with short runs widened to whole rows where that costs at most
    ``_WIDEN_FACTOR`` x the bytes, or where it would otherwise take over ``_MAX_RUNS`` reads."""
    box = list(box)
    if any(hi == lo for lo, hi in box):
        return box
    while shape:
        j = split_dim(shape, box)
        if j == 0:
            return box
        runs = math.prod(hi - lo for lo, hi in box[:j])
        if runs <= 1:
            return box
        now = math.prod(hi - lo for lo, hi in box)
        wider = now // (box[j][1] - box[j][0]) * shape[j]
        if wider > _WIDEN_FACTOR * now and runs <= _MAX_RUNS:
            return box
        box[j] = (0, shape[j])
    return box
