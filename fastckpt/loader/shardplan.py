"""Plans that read part of a checkpoint, or read it into memory the caller owns.

- ``plan_shards``: a tensor-parallel rank's share of each tensor (a "box": one ``(lo, hi)`` per
  dimension). A row shard is one range of the file; a column shard is its row segments, or the
  span they lie in when the caller's ``gather`` rule (``policy.gather_runs``) finds one read
  cheaper. Used by ``iter_tensors(boxes=...)`` (the vLLM weight source with TP > 1).
- ``plan_into``: every tensor into a buffer of exactly its bytes, so that ``Loader.execute(into=
  ...)`` can fill the caller's memory (a model's parameters, from a per-rank export).
- The box helpers (``box_runs``, ``split_dim``, ...) shared with ``loader.lazy``'s slices.

Pure Python like ``plan``: no torch, no C++ core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from fastckpt.format import dtypes
from fastckpt.format.index import Index, TensorEntry

# plan's segment helpers (placing byte ranges in a buffer the way plan_load does), shared here
from fastckpt.loader.plan import (
    PAGE,
    BufferPlan,
    LoadPlan,
    ReadOp,
    ViewPlan,
    _align_up,
    _packed,
    _place,
    _segments,
    check_chunk_bytes,
    contiguous_strides,
    resolve_device,
)

Box = tuple[tuple[int, int], ...]
"""A sub-array of a tensor: one ``(lo, hi)`` range per dimension (``hi`` exclusive)."""


def whole_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def check_box(shape: tuple[int, ...], box: Box, name: str = "") -> Box:
    """``box`` as a tuple of int pairs inside ``shape``; ValueError otherwise."""
    box = tuple((int(lo), int(hi)) for lo, hi in box)
    if len(box) != len(shape) or any(
        not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape, strict=True)
    ):
        raise ValueError(f"box {list(box)} does not lie inside tensor {name!r} of shape {shape}")
    return box


def split_dim(shape: tuple[int, ...] | list[int], box: Box | list[tuple[int, int]]) -> int:
    """The innermost dimension that ``box`` does not hold whole (its runs are spans along it)."""
    j = len(shape) - 1
    while j > 0 and tuple(box[j]) == (0, shape[j]):
        j -= 1
    return j


def box_runs(
    shape: tuple[int, ...] | list[int], box: Box | list[tuple[int, int]], itemsize: int
) -> list[tuple[int, int]]:
    """(byte offset in the tensor, length) of each contiguous run of the C-ordered tensor's
    bytes that ``box`` covers, in increasing order; runs that touch are one run. An empty box
    has no runs."""
    ndim = len(shape)
    if ndim == 0:
        return [(0, itemsize)]
    if any(hi <= lo for lo, hi in box):
        return []
    # inner[j] = bytes of one step along dim j (the product of the dims after it)
    inner = [itemsize] * ndim
    for j in range(ndim - 2, -1, -1):
        inner[j] = inner[j + 1] * shape[j + 1]
    j = split_dim(shape, box)
    lo, hi = box[j]
    run = (hi - lo) * inner[j]
    starts = [0]
    for d, (a, b) in enumerate(box[:j]):
        starts = [s + i * inner[d] for s in starts for i in range(a, b)]
    return [(s + lo * inner[j], run) for s in starts]


def shard_box(shape: tuple[int, ...], dim: int, rank: int, size: int) -> Box:
    """The box rank ``rank`` of ``size`` keeps of a tensor split evenly along ``dim`` (the last
    rank keeps what is left when ``shape[dim]`` does not divide evenly: vLLM pads instead)."""
    if not 0 <= dim < len(shape) or not 0 <= rank < size:
        raise ValueError(f"no shard {rank} of {size} along dim {dim} of shape {shape}")
    per = -(-shape[dim] // size)
    lo = min(shape[dim], rank * per)
    hi = min(shape[dim], lo + per)
    return tuple((lo, hi) if d == dim else (0, n) for d, n in enumerate(shape))


def plan_shards(
    index: Index,
    wants: Mapping[str, Box | None],
    device: str,
    *,
    chunk_bytes: int,
    gather: Callable[[int, int, int], bool] | None = None,
) -> LoadPlan:
    """Plan reading only a box of each tensor (a tensor-parallel rank's share).

    ``wants`` maps stored tensor names to the box to read (``None``: the whole tensor); each
    view has the box's shape. How a box is read depends on its runs in the file:

    - whole tensors and boxes that are one run of the file (a row shard: rows ``[a, b)``) are
      ranges of the partition, laid out like the file in one buffer per partition (mappable,
      like ``plan_load``'s), each read to the byte (no page rounding, no merging across gaps);
    - a box of several runs (a column shard: a segment of every row) is read as its runs only,
      packed one after the other into a buffer of their own (exactly the bytes kept; never
      mapped), or, where ``gather(runs, kept_bytes, span_bytes)`` says False (one read of the
      span beats many small ones: the policy's ``gather_runs``), as the whole span from its
      first to its last byte in the file-layout buffer, viewed with the tensor's strides.
      Default: always gather.

    Pure (no torch); ``LoadPlan.read_nbytes`` is what the rank reads.
    """
    check_chunk_bytes(chunk_bytes)
    device = resolve_device(device)
    ranges: dict[int, list[tuple[int, int, TensorEntry, Box, bool]]] = {}
    gathered: dict[int, list[tuple[TensorEntry, Box, list[tuple[int, int]]]]] = {}
    for name, box in wants.items():
        e = index.tensors.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not stored in the checkpoint at {index.root}")
        box = whole_box(e.shape) if box is None else check_box(e.shape, box, name)
        itemsize = dtypes.get(e.dtype).itemsize
        runs = box_runs(e.shape, box, itemsize) if e.nbytes else []
        if len(runs) <= 1:
            lo, n = runs[0] if runs else (0, 0)
            ranges.setdefault(e.partition, []).append((e.offset + lo, n, e, box, False))
            continue
        kept = sum(n for _, n in runs)
        span = runs[-1][0] + runs[-1][1] - runs[0][0]
        if gather is None or gather(len(runs), kept, span):
            gathered.setdefault(e.partition, []).append((e, box, runs))
        else:
            ranges.setdefault(e.partition, []).append((e.offset + runs[0][0], span, e, box, True))

    buffers: list[BufferPlan] = []
    reads: list[ReadOp] = []
    views: list[ViewPlan] = []
    for part_i in sorted(set(ranges) | set(gathered)):
        mine = sorted(ranges.get(part_i, []), key=lambda r: (r[0], r[1]))
        if mine:
            buf_i = len(buffers)
            segs = _segments(
                ((lo, lo + n) for lo, n, *_ in mine if n),
                index.partitions[part_i].nbytes,
                None,
                exact=True,
            )
            placed, seg_reads, cursor = _place(segs, buf_i, part_i, chunk_bytes)
            reads.extend(seg_reads)
            buffers.append(
                BufferPlan(
                    buf_i, device, part_i, _align_up(cursor, PAGE), tuple(placed), mappable=True
                )
            )
            for lo, n, e, box, strided in mine:
                rel = next((d + lo - s for s, t, d in placed if s <= lo and lo + n <= t), 0)
                shape = tuple(hi - a for a, hi in box)
                itemsize = dtypes.get(e.dtype).itemsize
                views.append(
                    ViewPlan(
                        name=e.name,
                        buffer=buf_i,
                        rel_offset=rel,
                        nbytes=math.prod(shape) * itemsize if n else 0,
                        dtype=e.dtype,
                        shape=shape,
                        aligned=rel % itemsize == 0,
                        partition=part_i,
                        file_offset=lo,
                        strides=contiguous_strides(e.shape) if strided else None,
                    )
                )
        packed = gathered.get(part_i, [])
        if packed:
            buf_i = len(buffers)
            segments: list[tuple[int, int, int]] = []
            cursor = 0
            for e, box, runs in packed:
                itemsize = dtypes.get(e.dtype).itemsize
                start = _align_up(cursor, max(itemsize, 64))
                segs_e, reads_e, cursor = _packed(
                    buf_i, part_i, ((e.offset + lo, n) for lo, n in runs), start, chunk_bytes
                )
                segments.extend(segs_e)
                reads.extend(reads_e)
                views.append(
                    ViewPlan(
                        name=e.name,
                        buffer=buf_i,
                        rel_offset=start,
                        nbytes=cursor - start,
                        dtype=e.dtype,
                        shape=tuple(hi - lo for lo, hi in box),
                        aligned=True,
                        partition=part_i,
                        file_offset=e.offset + runs[0][0],
                    )
                )
            buffers.append(
                BufferPlan(buf_i, device, part_i, cursor, tuple(segments), mappable=False)
            )
    return LoadPlan(
        buffers=tuple(buffers),
        reads=tuple(reads),
        views=tuple(views),
        aliases={},
        checks=(),
        devices=(device,) if buffers else (),
    )


def plan_into(index: Index, names: Iterable[str], device: str, *, chunk_bytes: int) -> LoadPlan:
    """Plan reading whole stored tensors each into memory of its own that the caller hands to
    the executor (``Loader.execute(into=...)``: buffer ``i`` is the i-th name's tensor, exactly
    its bytes): a model's own parameters, filled with no copy on the device. Buffers are never
    mapped."""
    check_chunk_bytes(chunk_bytes)
    device = resolve_device(device)
    buffers: list[BufferPlan] = []
    reads: list[ReadOp] = []
    views: list[ViewPlan] = []
    for name in names:
        e = index.tensors.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not stored in the checkpoint at {index.root}")
        buf_i = len(buffers)
        segments, mine, _ = _packed(
            buf_i, e.partition, [(e.offset, e.nbytes)] if e.nbytes else [], 0, chunk_bytes
        )
        reads.extend(mine)
        buffers.append(
            BufferPlan(buf_i, device, e.partition, e.nbytes, tuple(segments), mappable=False)
        )
        views.append(
            ViewPlan(e.name, buf_i, 0, e.nbytes, e.dtype, e.shape, True, e.partition, e.offset)
        )
    return LoadPlan(
        buffers=tuple(buffers),
        reads=tuple(reads),
        views=tuple(views),
        aliases={},
        checks=(),
        devices=(device,) if buffers else (),
    )
