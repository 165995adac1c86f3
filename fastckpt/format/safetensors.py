"""Read stock safetensors headers into a validated ``Index`` (FORMAT.md section 7). No torch.

A safetensors file is ``u64 header_len`` (little-endian), a JSON header of that many bytes, then
the data section. Each file becomes one ``PartitionEntry`` whose data section starts at
``8 + header_len``; tensor offsets in the ``Index`` are absolute in the file. Validation mirrors
the fastckpt reader: limits before allocation, known dtypes, ``data_offsets`` consistent with
dtype x shape and inside the file, no overlaps, names unique across shards.
"""

from __future__ import annotations

import os
import struct
from types import MappingProxyType
from typing import Any

from fastckpt.errors import (
    CorruptIndexError,
    DtypeError,
    LimitError,
    MissingPartitionError,
    OutOfBoundsError,
    TruncatedError,
)
from fastckpt.format import dtypes, spec
from fastckpt.format.fsdir import Dir, OpenFile
from fastckpt.format.index import Index, PartitionEntry, TensorEntry
from fastckpt.rules.carried import is_carried_name

SAFETENSORS_VERSION = (0, 0)
"""``Index.version`` of a safetensors source (the format carries no version)."""

# Codes written by safetensors >= 0.6 that the shared dtype registry does not list (yet).
_EXTRA_CODES = {"F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}

# 6-bit floats (MX formats) that safetensors can name but no torch release can hold yet.
_NO_TORCH_CODES = {"F6_E2M3": "float6_e2m3fn", "F6_E3M2": "float6_e3m2fn"}


def _dtype(code: object, *, path: str, tensor: str) -> dtypes.DType:
    if not isinstance(code, str):
        raise DtypeError(f"dtype must be a string, got {spec.show(code)}", path=path, tensor=tensor)
    if code in _EXTRA_CODES:
        return dtypes.get(_EXTRA_CODES[code], path=path, tensor=tensor)
    if code in _NO_TORCH_CODES:
        raise DtypeError(
            f"safetensors dtype {code} (6-bit float) has no torch dtype: no torch release up to "
            f"2.13 defines {_NO_TORCH_CODES[code]}, so it cannot be loaded or converted",
            path=path,
            tensor=tensor,
        )
    return dtypes.from_safetensors(code, path=path, tensor=tensor)


def _packed_f4_shape(shape: tuple[int, ...], *, path: str, tensor: str) -> tuple[int, ...]:
    """safetensors ``F4`` shapes count 4-bit values; torch's ``float4_e2m1fn_x2`` packs two per
    byte, so its last dimension is half as long (as ``safetensors.torch`` returns it)."""
    if not shape or shape[-1] % 2:
        raise DtypeError(
            f"F4 tensor of shape {list(shape)}: its last dimension must be even (torch packs two "
            "4-bit values per float4_e2m1fn_x2 element)",
            path=path,
            tensor=tensor,
        )
    return (*shape[:-1], shape[-1] // 2)


class _Shard:
    """One parsed safetensors file: its partition entry, tensors and metadata."""

    def __init__(
        self, partition: PartitionEntry, tensors: list[TensorEntry], metadata: dict[str, str]
    ) -> None:
        self.partition = partition
        self.tensors = tensors
        self.metadata = metadata


HEADER_PROBE_NBYTES = 1 << 16
"""Bytes a reader fetching a safetensors file from afar asks for first (usually the whole
header); ``header_span`` then says how much more it needs."""


def header_span(first: bytes, size: int, *, path: str) -> int:
    """Bytes ``[0, n)`` of a ``size``-byte safetensors file that hold its header, from the file's
    first bytes (at least 8): for a reader that fetches the header before the rest. The limits
    ``parse_file`` enforces are enforced here too."""
    if size < 8 or len(first) < 8:
        raise TruncatedError(
            f"safetensors file is {size} bytes; its header length alone is 8", path=path
        )
    (header_len,) = struct.unpack("<Q", first[:8])
    if header_len > spec.MAX_SAFETENSORS_HEADER_NBYTES:
        raise LimitError(
            f"safetensors header length = {header_len}; the limit is "
            f"{spec.MAX_SAFETENSORS_HEADER_NBYTES}",
            path=path,
            offset=0,
        )
    if 8 + header_len > size:
        raise TruncatedError(
            f"safetensors file is {size} bytes; its header alone needs {8 + header_len}",
            path=path,
            offset=size,
        )
    return 8 + int(header_len)


def parse_file(f: OpenFile, name: str, partition: int) -> _Shard:
    """Parse and validate the header of the open safetensors file ``f`` (partition
    ``partition``, file name ``name`` in its directory). ``f`` stays open."""
    path, size, fd = f.path, f.size, f.fd
    if size < 8:
        raise TruncatedError(
            f"safetensors file is {size} bytes; its header length alone is 8",
            path=path,
            offset=size,
        )
    (header_len,) = struct.unpack("<Q", spec.pread_exact(fd, 8, 0, path=path, what="header"))
    if header_len > spec.MAX_SAFETENSORS_HEADER_NBYTES:
        raise LimitError(
            f"safetensors header length = {header_len}; the limit is "
            f"{spec.MAX_SAFETENSORS_HEADER_NBYTES}",
            path=path,
            offset=0,
        )
    data_start = 8 + header_len
    if data_start > size:
        raise TruncatedError(
            f"safetensors file is {size} bytes; its header alone needs {data_start}",
            path=path,
            offset=size,
        )
    raw = spec.pread_exact(fd, header_len, 8, path=path, what="safetensors header")
    doc = spec.loads_json(raw, path=path, what="safetensors header")
    if not isinstance(doc, dict):
        raise CorruptIndexError(
            f"safetensors header must be a JSON object, got {type(doc).__name__}", path=path
        )
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptIndexError(
            f"__metadata__ must map strings to strings, got {spec.show(metadata)}", path=path
        )
    tensors = [
        _tensor(key, value, path=path, partition=partition, data_start=data_start, size=size)
        for key, value in doc.items()
    ]
    tensors.sort(key=lambda t: (t.offset, t.end))
    spec.check_no_overlap(
        [spec.Span(partition, t.offset, t.end, t.name) for t in tensors],
        paths={partition: path},
    )
    _check_covered(tensors, data_start=data_start, size=size, path=path)
    entry = PartitionEntry(file=name, path=path, nbytes=size, data_start=data_start, data_end=size)
    return _Shard(entry, tensors, metadata)


def _check_covered(tensors: list[TensorEntry], *, data_start: int, size: int, path: str) -> None:
    """As the safetensors library requires: in offset order, each tensor starts where the
    previous one ended (the first at 0), and the last one ends where the file ends."""
    pos = data_start
    for t in tensors:
        if t.offset != pos:
            what = "leaves a gap before it" if t.offset > pos else "does not follow the previous"
            raise CorruptIndexError(
                f"data_offsets start at {t.offset - data_start}, but the previous tensor ends at "
                f"{pos - data_start}: the tensor {what} (safetensors requires tensors to cover "
                "the data section contiguously)",
                path=path,
                tensor=t.name,
                offset=t.offset,
            )
        pos = t.end
    if pos != size:
        raise CorruptIndexError(
            f"the data section holds {size - pos} bytes after the last tensor (safetensors "
            "requires the tensors to cover it exactly)",
            path=path,
            offset=pos,
        )


def _tensor(
    name: str, info: Any, *, path: str, partition: int, data_start: int, size: int
) -> TensorEntry:
    if not isinstance(info, dict):
        raise CorruptIndexError(
            f"header entry must be an object with dtype, shape and data_offsets, got "
            f"{spec.show(info)}",
            path=path,
            tensor=name,
        )
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CorruptIndexError(f"header entry lacks {key!r}", path=path, tensor=name)
    spec.check_tensor_name(name, path=path)
    item = _dtype(info["dtype"], path=path, tensor=name)
    shape = spec.check_shape(info["shape"], path=path, tensor=name, limit_ndim=False)
    if info["dtype"] == "F4":
        shape = _packed_f4_shape(shape, path=path, tensor=name)
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise CorruptIndexError(
            f"data_offsets must be [begin, end], got {spec.show(offsets)}", path=path, tensor=name
        )
    begin = spec.check_uint(offsets[0], "data_offsets[0]", path=path, tensor=name)
    end = spec.check_uint(offsets[1], "data_offsets[1]", path=path, tensor=name)
    if end < begin:
        raise CorruptIndexError(
            f"data_offsets [{begin}, {end}] end before they begin", path=path, tensor=name
        )
    expected = spec.shape_nbytes(item.itemsize, shape, path=path, tensor=name)
    if end - begin != expected:
        raise DtypeError(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {info['dtype']} "
            f"({item.itemsize} bytes) x shape {list(shape)} = {expected}",
            path=path,
            tensor=name,
        )
    if data_start + end > size:
        raise OutOfBoundsError(
            f"bytes [{data_start + begin}, {data_start + end}) lie outside the {size}-byte file",
            path=path,
            tensor=name,
            offset=data_start + begin,
        )
    return TensorEntry(name, partition, data_start + begin, expected, item.name, shape)


_JSON_SPACE = b" \t\n\r"


def looks_like_safetensors(head: bytes) -> bool:
    """Do the first bytes of a file look like a safetensors file (a JSON object after the
    8-byte header length, JSON whitespace allowed before it)? For files without the suffix."""
    rest = head[8:].lstrip(_JSON_SPACE)
    return len(head) > 8 and rest[:1] == b"{"


def open_shard(d: Dir, name: str) -> OpenFile:
    """Open shard ``name`` beneath ``d`` (``MissingPartitionError`` when absent or not a file)."""
    try:
        return d.open(name, error=MissingPartitionError, what="safetensors file")
    except FileNotFoundError:
        raise MissingPartitionError("safetensors file is missing", path=d.join(name)) from None


def read_files(
    root: str,
    files: list[tuple[str, OpenFile]],
    *,
    carried: tuple[str, ...] = (),
    source: str,
    index_json: str | None = None,
    weight_map: dict[str, str] | None = None,
) -> Index:
    """An ``Index`` over the open safetensors ``files`` (``(name, file)`` pairs, each one a
    partition) of the directory ``root``.

    ``carried``: the directory's carried files. ``weight_map`` (from an index json): every name
    in it must be in the shard it names.
    """
    root = os.path.abspath(root)
    names = [name for name, _ in files]
    shards = [parse_file(f, name, i) for i, (name, f) in enumerate(files)]
    owner: dict[str, int] = {}
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for i, shard in enumerate(shards):
        for t in shard.tensors:
            if t.name in owner:
                raise CorruptIndexError(
                    f"tensor name appears in two shards: {names[owner[t.name]]!r} and "
                    f"{names[i]!r}; names must be unique across shards",
                    path=shard.partition.path,
                    tensor=t.name,
                )
            owner[t.name] = i
            tensors[t.name] = t
        for key, value in shard.metadata.items():
            metadata.setdefault(key, value)
    if weight_map is not None:
        where = index_json or root
        for name, file in weight_map.items():
            held = owner.get(name)
            if held is None or names[held] != file:
                raise CorruptIndexError(
                    f"weight_map says tensor is in {file!r}, but "
                    + ("no shard holds it" if held is None else f"it is in {names[held]!r}"),
                    path=where,
                    tensor=name,
                )
    src: dict[str, Any] = {"kind": "safetensors", "path": source, "shards": len(names)}
    if index_json is not None:
        src["index"] = os.path.basename(index_json)
    return Index(
        root=root,
        kind="safetensors",
        version=SAFETENSORS_VERSION,
        tensors=MappingProxyType(tensors),
        partitions=tuple(s.partition for s in shards),
        alignment=1,
        metadata=MappingProxyType(metadata),
        source=MappingProxyType(src),
        files=carried,
    )


def read_sharded(
    d: Dir, index_file: OpenFile, opened: list[OpenFile], *, carried: bool = True
) -> Index:
    """An ``Index`` over the shards (beneath ``d``) named by the open ``*.safetensors.index.json``
    ``index_file``. Each shard's open file is appended to ``opened`` in partition order."""
    index_json, size = index_file.path, index_file.size
    if size > spec.MAX_SAFETENSORS_HEADER_NBYTES:
        raise LimitError(
            f"index json is {size} bytes; the limit is {spec.MAX_SAFETENSORS_HEADER_NBYTES}",
            path=index_json,
        )
    raw = spec.pread_exact(index_file.fd, size, 0, path=index_json, what="index json")
    doc = spec.loads_json(raw, path=index_json, what="index json")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptIndexError(
            "index json must be an object with a 'weight_map' object", path=index_json
        )
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CorruptIndexError(
                f"weight_map value must be a file name, got {spec.show(file)}",
                path=index_json,
                tensor=name,
            )
        spec.check_file_name(file, path=index_json)
    names = sorted(set(weight_map.values()))
    shard_files: list[OpenFile] = []
    try:
        for name in names:
            shard_files.append(open_shard(d, name))
    finally:
        opened.extend(shard_files)  # the caller closes them, also on failure
    return read_files(
        d.path,
        list(zip(names, shard_files, strict=True)),
        carried=carried_files(d) if carried else (),
        source=d.path,
        index_json=index_json,
        weight_map=weight_map,
    )


def carried_files(d: Dir) -> tuple[str, ...]:
    """The directory's top-level regular files (beneath it) that are not weights, weight indexes
    or hidden."""
    out = []
    for name in d.listdir():
        if not is_carried_name(name):
            continue
        try:
            spec.check_file_name(name, path=d.path)
        except ValueError:
            continue
        if d.is_file(name):
            out.append(name)
    return tuple(out)


__all__ = [
    "HEADER_PROBE_NBYTES",
    "SAFETENSORS_VERSION",
    "carried_files",
    "header_span",
    "looks_like_safetensors",
    "open_shard",
    "parse_file",
    "read_files",
    "read_sharded",
]
