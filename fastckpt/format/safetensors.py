"""Read stock safetensors headers into a validated ``Index`` (FORMAT.md section 7). No torch.

A safetensors file is ``u64 header_len`` (little-endian), a JSON header of that many bytes, then
the data section. Each file becomes one ``PartitionEntry`` whose data section starts at
``8 + header_len``; tensor offsets in the ``Index`` are absolute in the file. Validation mirrors
the fastckpt reader: limits before allocation, known dtypes, ``data_offsets`` consistent with
dtype x shape and inside the file, no overlaps, names unique across shards.
"""

from __future__ import annotations

import os
import stat
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
from fastckpt.format.index import Index, PartitionEntry, TensorEntry
from fastckpt.rules.carried import is_carried_name

SAFETENSORS_VERSION = (0, 0)
"""``Index.version`` of a safetensors source (the format carries no version)."""

# Codes written by safetensors >= 0.6 that the shared dtype registry does not list (yet).
_EXTRA_CODES = {"F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


def _dtype(code: object, *, path: str, tensor: str) -> dtypes.DType:
    if not isinstance(code, str):
        raise DtypeError(f"dtype must be a string, got {spec.show(code)}", path=path, tensor=tensor)
    if code in _EXTRA_CODES:
        return dtypes.get(_EXTRA_CODES[code], path=path, tensor=tensor)
    return dtypes.from_safetensors(code, path=path, tensor=tensor)


class _Shard:
    """One parsed safetensors file: its partition entry, tensors and metadata."""

    def __init__(
        self, partition: PartitionEntry, tensors: list[TensorEntry], metadata: dict[str, str]
    ) -> None:
        self.partition = partition
        self.tensors = tensors
        self.metadata = metadata


def parse_file(root: str, name: str, partition: int) -> _Shard:
    """Parse and validate the header of ``root/name`` (partition number ``partition``)."""
    path = os.path.join(root, name)
    try:
        fd, size = spec.open_regular(path, error=MissingPartitionError, what="safetensors file")
    except FileNotFoundError:
        raise MissingPartitionError("safetensors file is missing", path=path) from None
    try:
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
    finally:
        os.close(fd)
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
    tensors.sort(key=lambda t: t.offset)
    spec.check_no_overlap(
        [spec.Span(partition, t.offset, t.end, t.name) for t in tensors],
        paths={partition: path},
    )
    entry = PartitionEntry(file=name, path=path, nbytes=size, data_start=data_start, data_end=size)
    return _Shard(entry, tensors, metadata)


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
    item = _dtype(info["dtype"], path=path, tensor=name)
    shape = spec.check_shape(info["shape"], path=path, tensor=name)
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


def read_files(
    root: str,
    names: list[str],
    *,
    carried: bool,
    source: str,
    index_json: str | None = None,
    weight_map: dict[str, str] | None = None,
) -> Index:
    """An ``Index`` over the safetensors files ``names`` in ``root`` (each one a partition).

    ``carried``: list the directory's non-weight files as carried files. ``weight_map`` (from an
    index json): every name in it must be in the shard it names.
    """
    root = os.path.abspath(root)
    shards = [parse_file(root, name, i) for i, name in enumerate(names)]
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
        files=carried_files(root) if carried else (),
    )


def read_sharded(index_json: str) -> Index:
    """An ``Index`` over the shards named by a ``*.safetensors.index.json`` file."""
    index_json = os.path.abspath(index_json)
    fd, size = spec.open_regular(index_json, error=CorruptIndexError, what="index json")
    try:
        if size > spec.MAX_SAFETENSORS_HEADER_NBYTES:
            raise LimitError(
                f"index json is {size} bytes; the limit is {spec.MAX_SAFETENSORS_HEADER_NBYTES}",
                path=index_json,
            )
        raw = spec.pread_exact(fd, size, 0, path=index_json, what="index json")
    finally:
        os.close(fd)
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
    return read_files(
        os.path.dirname(index_json),
        names,
        carried=True,
        source=os.path.dirname(index_json),
        index_json=index_json,
        weight_map=weight_map,
    )


def carried_files(root: str) -> tuple[str, ...]:
    """The directory's top-level regular files that are not weights, weight indexes or hidden."""
    out = []
    for name in sorted(os.listdir(root)):
        if not is_carried_name(name):
            continue
        try:
            spec.check_file_name(name, path=root)
            st = os.stat(os.path.join(root, name))
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            out.append(name)
    return tuple(out)


__all__ = ["SAFETENSORS_VERSION", "carried_files", "parse_file", "read_files", "read_sharded"]
