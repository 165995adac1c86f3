"""Plan a load: index + target -> buffers to allocate, reads to issue, tensor views to make.

Pure Python: no torch, no C++ core, so ``fastckpt.sched`` can estimate a load from the very plan
that the executor will run. A plan is a tuple of frozen dataclasses; executing it is
``fastckpt.loader.executor``'s job.

Layout rule: device layout = file layout. Each (partition, device) pair becomes one buffer on
that device. The buffer holds the byte ranges ("segments") of the partition that the device's
tensors occupy, each placed at a destination offset with the same remainder modulo 4096 as its
file offset, so that O_DIRECT can read straight into it and tensors become views at fixed offsets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastckpt.errors import DeviceError
from fastckpt.format import dtypes
from fastckpt.format.index import Index, TensorEntry
from fastckpt.rules.devices import canonical_device as resolve_device
from fastckpt.rules.devices import canonical_device_map, device_for

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.shardplan import Box

PAGE = 4096
# Two tensors of one device whose byte ranges are at most this far apart share a segment (the gap
# is read too): one larger read beats two smaller ones.
MERGE_GAP_BYTES = 1 << 20


@dataclass(frozen=True)
class ReadOp:
    """Read ``nbytes`` at ``file_offset`` of partition ``partition`` into buffer ``buffer`` at
    ``dest_offset``."""

    buffer: int
    partition: int
    file_offset: int
    nbytes: int
    dest_offset: int


@dataclass(frozen=True)
class BufferPlan:
    """One allocation on ``device`` holding bytes of one partition."""

    index: int
    device: str
    partition: int
    nbytes: int
    # (file_start, file_end, dest_offset) of every segment, in file order
    segments: tuple[tuple[int, int, int], ...]
    # False when the buffer is not laid out like the file (packed runs, a caller's own memory):
    # it is read, never mapped
    mappable: bool = True


@dataclass(frozen=True)
class ViewPlan:
    """A tensor made as a view of ``buffer`` at ``rel_offset`` (relative to the buffer start).

    ``aligned`` is False when ``rel_offset`` is not a multiple of the dtype's size: such a
    tensor cannot be a view and is copied into memory of its own after the reads.
    """

    name: str
    buffer: int
    rel_offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    aligned: bool
    partition: int = 0
    file_offset: int = 0  # the tensor's absolute offset in its partition file
    # element strides of the view when it is not contiguous (a column shard read with the rest
    # of its rows), else None
    strides: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChunkCheck:
    """Checksum chunk ``chunk`` of partition ``partition`` lies in buffer ``buffer`` at
    ``dest_offset``; it covers file bytes ``[file_offset, file_offset + nbytes)``."""

    buffer: int
    partition: int
    chunk: int
    file_offset: int
    nbytes: int
    dest_offset: int
    expected: int


@dataclass(frozen=True)
class LoadPlan:
    buffers: tuple[BufferPlan, ...]
    reads: tuple[ReadOp, ...]
    views: tuple[ViewPlan, ...]
    aliases: Mapping[str, str]
    checks: tuple[ChunkCheck, ...]
    devices: tuple[str, ...]

    @property
    def read_nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def tensor_nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)


def _align_down(x: int, a: int) -> int:
    return x - x % a


def _align_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _resolve_targets(index: Index, target: object, names: Iterable[str]) -> dict[str, str]:
    """Map each stored tensor name to its canonical device string."""
    if isinstance(target, Mapping):
        dmap = canonical_device_map(target)
        out: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            dev = device_for(name, dmap)
            if dev is None:
                # A tied tensor may be named only through its alias in the map.
                for alias, canon in index.aliases.items():
                    if canon == name:
                        dev = device_for(alias, dmap)
                        if dev is not None:
                            break
            if dev is None:
                missing.append(name)
            else:
                out[name] = dev
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DeviceError(
                f"device map places no device for tensor(s) {shown}{more}; add a matching "
                "prefix or a default entry '' to the map"
            )
        return out
    dev = resolve_device(target)
    return dict.fromkeys(names, dev)


def _segments(
    ranges: Iterable[tuple[int, int]],
    file_nbytes: int,
    chunk_bytes: int | None,
    *,
    exact: bool = False,
) -> list[tuple[int, int]]:
    """Merge byte ranges [start, end) of one partition (sorted by start, none empty) into
    [start, end) segments.

    Segments start and end on page boundaries (capped at the file size), or on checksum chunk
    boundaries when ``chunk_bytes`` is given, so every chunk the segment touches is read whole;
    ranges at most ``MERGE_GAP_BYTES`` apart share a segment. ``exact``: segments are the ranges
    themselves, merged only where they touch (a rank's share, read to the byte).
    """
    grain = 1 if exact else chunk_bytes or PAGE
    gap = 0 if exact else MERGE_GAP_BYTES
    segs: list[tuple[int, int]] = []
    for lo, hi in ranges:
        start = _align_down(lo, grain)
        end = min(_align_up(hi, grain), file_nbytes)
        if segs and start <= segs[-1][1] + gap:
            prev_start, prev_end = segs[-1]
            segs[-1] = (prev_start, max(prev_end, end))
        else:
            segs.append((start, end))
    return segs


def _place(
    segs: list[tuple[int, int]], buffer: int, partition: int, chunk_bytes: int
) -> tuple[list[tuple[int, int, int]], list[ReadOp], int]:
    """Lay file segments out in one buffer, each at a destination offset with the same remainder
    modulo ``PAGE`` as its file offset (O_DIRECT reads land straight in it), and cut their reads
    into pieces of at most ``chunk_bytes`` on ``chunk_bytes`` boundaries of the file. Returns
    (placed segments, reads, bytes used)."""
    placed: list[tuple[int, int, int]] = []
    reads: list[ReadOp] = []
    cursor = 0
    for start, end in segs:
        dest = _align_up(cursor, PAGE) + start % PAGE
        placed.append((start, end, dest))
        cursor = dest + (end - start)
        piece_start = start
        while piece_start < end:
            piece_end = min(end, _align_down(piece_start, chunk_bytes) + chunk_bytes)
            reads.append(
                ReadOp(
                    buffer=buffer,
                    partition=partition,
                    file_offset=piece_start,
                    nbytes=piece_end - piece_start,
                    dest_offset=dest + (piece_start - start),
                )
            )
            piece_start = piece_end
    return placed, reads, cursor


def plan_load(
    index: Index,
    target: object = "cpu",
    *,
    names: Iterable[str] | None = None,
    chunk_bytes: int = 32 << 20,
    verify: bool = False,
) -> LoadPlan:
    """Plan loading ``names`` (default: every tensor) of ``index`` onto ``target``.

    ``target`` is a device ("cpu", "cuda:N", an int) or a device map ``{name prefix: device}``.
    Reads are split into pieces of at most ``chunk_bytes`` (kept on checksum chunk boundaries
    when ``verify`` is set, so each piece can be checked on its own).
    """
    check_chunk_bytes(chunk_bytes)
    if names is None:
        stored = list(index.tensors)
        wanted_aliases = dict(index.aliases)
    else:
        stored_set: dict[str, None] = {}
        wanted_aliases = {}
        for n in names:
            if n in index.aliases:
                wanted_aliases[n] = index.aliases[n]
                stored_set[index.aliases[n]] = None
            elif n in index.tensors:
                stored_set[n] = None
            else:
                raise KeyError(f"tensor {n!r} is not in the checkpoint at {index.root}")
        stored = list(stored_set)
    devices_of = _resolve_targets(index, target, stored)

    check_chunk = index.checksum_chunk_bytes if verify else None
    if verify and check_chunk:
        # Split reads on checksum chunk boundaries: one whole chunk per piece (a device load
        # checks each piece's CRC as a whole), or whole pieces per chunk when a chunk is larger
        # than a piece.
        if check_chunk <= chunk_bytes:
            chunk_bytes = check_chunk
        else:
            # the largest page multiple <= chunk_bytes that divides the checksum chunk
            while check_chunk % chunk_bytes:
                chunk_bytes -= PAGE

    # Group stored tensors by (partition, device) in load order.
    groups: dict[tuple[int, str], list[TensorEntry]] = {}
    for name in stored:
        e = index.tensors[name]
        groups.setdefault((e.partition, devices_of[name]), []).append(e)

    buffers: list[BufferPlan] = []
    reads: list[ReadOp] = []
    views: list[ViewPlan] = []
    checks: list[ChunkCheck] = []
    order = sorted(groups, key=lambda k: (k[0], k[1]))
    for part_i, dev in order:
        entries = sorted(groups[(part_i, dev)], key=lambda e: e.offset)
        part = index.partitions[part_i]
        segs = _segments(((e.offset, e.end) for e in entries if e.nbytes), part.nbytes, check_chunk)
        buf_i = len(buffers)
        placed, seg_reads, cursor = _place(segs, buf_i, part_i, chunk_bytes)
        reads.extend(seg_reads)
        for start, end, dest in placed:
            if check_chunk and part.checksums is not None:
                first = start // check_chunk
                last = -(-end // check_chunk)
                for k in range(first, last):
                    c_start = k * check_chunk
                    c_end = min(c_start + check_chunk, part.nbytes)
                    checks.append(
                        ChunkCheck(
                            buffer=buf_i,
                            partition=part_i,
                            chunk=k,
                            file_offset=c_start,
                            nbytes=c_end - c_start,
                            dest_offset=dest + (c_start - start),
                            expected=part.checksums[k],
                        )
                    )
        nbytes = _align_up(cursor, PAGE) if cursor else 0
        buffers.append(
            BufferPlan(
                index=buf_i, device=dev, partition=part_i, nbytes=nbytes, segments=tuple(placed)
            )
        )
        for e in entries:
            itemsize = dtypes.get(e.dtype).itemsize
            if e.nbytes == 0:
                rel = 0
            else:
                rel = next(d + (e.offset - s) for s, t, d in placed if s <= e.offset and e.end <= t)
            views.append(
                ViewPlan(
                    name=e.name,
                    buffer=buf_i,
                    rel_offset=rel,
                    nbytes=e.nbytes,
                    dtype=e.dtype,
                    shape=e.shape,
                    aligned=rel % itemsize == 0,
                    partition=e.partition,
                    file_offset=e.offset,
                )
            )

    devices = tuple(sorted({b.device for b in buffers} | set(devices_of.values())))
    return LoadPlan(
        buffers=tuple(buffers),
        reads=tuple(reads),
        views=tuple(views),
        aliases=wanted_aliases,
        checks=tuple(checks),
        devices=devices,
    )


def plan_partitions(index: Index, partitions: Iterable[int], *, chunk_bytes: int) -> LoadPlan:
    """Read whole partitions into host memory, file offset = buffer offset (a DRAM-tier fill):
    one CPU buffer per partition, no views."""
    check_chunk_bytes(chunk_bytes)
    buffers: list[BufferPlan] = []
    reads: list[ReadOp] = []
    for part_i in partitions:
        n = index.partitions[part_i].nbytes
        buf_i = len(buffers)
        buffers.append(
            BufferPlan(
                index=buf_i,
                device="cpu",
                partition=part_i,
                nbytes=n,
                segments=((0, n, 0),) if n else (),
            )
        )
        for lo in range(0, n, chunk_bytes):
            ln = min(chunk_bytes, n - lo)
            reads.append(ReadOp(buf_i, part_i, lo, ln, lo))
    return LoadPlan(
        buffers=tuple(buffers),
        reads=tuple(reads),
        views=(),
        aliases={},
        checks=(),
        devices=("cpu",) if buffers else (),
    )


def _packed(
    buffer: int, partition: int, runs: Iterable[tuple[int, int]], dest: int, chunk_bytes: int
) -> tuple[list[tuple[int, int, int]], list[ReadOp], int]:
    """Read file runs ``(file offset, length)`` one after the other into ``buffer`` from ``dest``
    on, each read at most ``chunk_bytes``. Returns (segments, reads, end offset)."""
    segments: list[tuple[int, int, int]] = []
    reads: list[ReadOp] = []
    for lo, length in runs:
        segments.append((lo, lo + length, dest))
        off = 0
        while off < length:
            n = min(chunk_bytes, length - off)
            reads.append(ReadOp(buffer, partition, lo + off, n, dest + off))
            off += n
        dest += length
    return segments, reads, dest


def plan_gather(
    entry: TensorEntry,
    runs: Iterable[tuple[int, int]],
    shape: tuple[int, ...],
    device: str,
    *,
    chunk_bytes: int,
) -> LoadPlan:
    """Read byte runs of one tensor, packed one after the other, into one buffer on ``device``
    and view them as a tensor of ``shape`` (a slice's bounding box). ``runs`` are (offset in the
    tensor, length). The buffer is packed, not laid out like the file, so it is read, never
    mapped."""
    check_chunk_bytes(chunk_bytes)
    segments, reads, dest = _packed(
        0, entry.partition, ((entry.offset + s, n) for s, n in runs), 0, chunk_bytes
    )
    buf = BufferPlan(0, device, entry.partition, dest, tuple(segments), mappable=False)
    view = ViewPlan(
        name=entry.name,
        buffer=0,
        rel_offset=0,
        nbytes=dest,
        dtype=entry.dtype,
        shape=shape,
        aligned=True,
        partition=entry.partition,
        file_offset=entry.offset,
    )
    return LoadPlan(
        buffers=(buf,),
        reads=tuple(reads),
        views=(view,),
        aliases={},
        checks=(),
        devices=(device,),
    )


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape``."""
    out = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = out[i + 1] * max(shape[i + 1], 1)
    return tuple(out)


def windows(
    index: Index,
    names: Iterable[str] | None,
    window_bytes: int,
    *,
    boxes: Mapping[str, Box | None] | None = None,
) -> list[list[tuple[str, list[str]]]]:
    """The stored tensors to yield, in storage order, cut into windows of at most
    ``window_bytes`` (of the boxes read, where ``boxes`` names some): each item is (stored name,
    [names to yield for it: itself if asked, then its aliases that were asked])."""
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
    order = sorted(index.tensors.values(), key=lambda e: (e.partition, e.offset, e.name))
    out: list[list[tuple[str, list[str]]]] = []
    size = 0
    for entry in order:
        own = wanted is None or entry.name in wanted
        if not own and entry.name not in aliases:
            continue
        yields = ([entry.name] if own else []) + aliases.get(entry.name, [])
        box = boxes.get(entry.name) if boxes is not None else None
        nbytes = entry.nbytes
        if box is not None:
            nbytes = math.prod(hi - lo for lo, hi in box) * dtypes.get(entry.dtype).itemsize
        if not out or (size + nbytes > window_bytes and size > 0):
            out.append([])
            size = 0
        out[-1].append((entry.name, yields))
        size += nbytes
    return out


def check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes <= 0 or chunk_bytes % PAGE:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be a positive multiple of {PAGE}")
