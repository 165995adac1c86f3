"""``info(path)``: a summary of a checkpoint (``fastckpt info``). Reads the index only; no torch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from fastckpt.format.reader import read_index
from fastckpt.rules.units import format_bytes

_MAX_LISTED_PARTITIONS = 16


class DtypeSummary(NamedTuple):
    """Stored tensors of one dtype: how many, and their bytes."""

    tensors: int
    nbytes: int


class PartitionSummary(NamedTuple):
    """One partition (or safetensors shard) file."""

    file: str
    nbytes: int
    device: str | None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, from its validated index.

    Attributes:
        path: the checkpoint's root directory.
        kind: ``"fastckpt"`` or ``"safetensors"``.
        version: the fastckpt format version ``(major, minor)``; ``(0, 0)`` for safetensors.
        tensors: number of stored tensors.
        aliases: number of alias names (tied tensors stored once).
        nbytes: bytes of tensor data, each stored tensor counted once.
        dtypes: dtype name -> (tensors, nbytes), largest first.
        partitions: (file, nbytes, device) of each data file, in load order.
        alignment: tensor offset alignment in bytes (1 for safetensors).
        checksum: e.g. ``"crc32c per 16777216 bytes"``, or None when the source has none.
        source: provenance recorded by the converter (fastckpt) or the source path.
        metadata: string metadata (safetensors ``__metadata__``, user metadata).
        files: carried non-weight files at the top level (config.json, tokenizer files, ...).
        tree: carried files in sub-folders, ``/``-separated (``1_Pooling/config.json``).
    """

    path: str
    kind: str
    version: tuple[int, int]
    tensors: int
    aliases: int
    nbytes: int
    dtypes: Mapping[str, DtypeSummary]
    partitions: tuple[PartitionSummary, ...]
    alignment: int
    checksum: str | None
    source: Mapping[str, Any]
    metadata: Mapping[str, str]
    files: tuple[str, ...]
    tree: tuple[str, ...] = ()

    def __str__(self) -> str:
        fmt = (
            f"fastckpt {self.version[0]}.{self.version[1]}"
            if self.kind == "fastckpt"
            else self.kind
        )
        alias_text = f" (+ {_count(self.aliases, 'alias')})" if self.aliases else ""
        lines = [
            f"checkpoint  {self.path}",
            f"format      {fmt}",
            f"tensors     {self.tensors}{alias_text}, {_size(self.nbytes)}",
        ]
        for i, (name, d) in enumerate(self.dtypes.items()):
            label = "dtypes" if i == 0 else ""
            lines.append(f"{label:<12}{name}: {_count(d.tensors, 'tensor')}, {_size(d.nbytes)}")
        total = sum(p.nbytes for p in self.partitions)
        lines.append(f"partitions  {len(self.partitions)}, {_size(total)} on disk")
        for p in self.partitions[:_MAX_LISTED_PARTITIONS]:
            device = f"  device {p.device}" if p.device is not None else ""
            lines.append(f"            {p.file}  {_size(p.nbytes)}{device}")
        if len(self.partitions) > _MAX_LISTED_PARTITIONS:
            lines.append(f"            ... {len(self.partitions) - _MAX_LISTED_PARTITIONS} more")
        lines.append(f"alignment   {self.alignment} bytes")
        lines.append(f"checksums   {self.checksum or 'none (this format stores none)'}")
        if self.source:
            lines.append("source      " + ", ".join(f"{k}={v}" for k, v in self.source.items()))
        if self.metadata:
            lines.append("metadata    " + ", ".join(f"{k}={v}" for k, v in self.metadata.items()))
        if self.files or self.tree:
            lines.append("files       " + ", ".join([*self.files, *self.tree]))
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    plural = word + ("es" if word.endswith("s") else "s")
    return f"{n} {word if n == 1 else plural}"


def _size(nbytes: int) -> str:
    return f"{nbytes} B" if nbytes < 1000 else f"{format_bytes(nbytes)} ({nbytes} B)"


def info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Summarise the checkpoint at ``path`` (any kind ``read_index`` accepts)."""
    index = read_index(path)
    counts: dict[str, list[int]] = {}
    for t in index.tensors.values():
        entry = counts.setdefault(t.dtype, [0, 0])
        entry[0] += 1
        entry[1] += t.nbytes
    by_size = sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))
    checksum = (
        f"{index.checksum_algorithm} per {index.checksum_chunk_bytes} bytes"
        if index.checksum_algorithm is not None
        else None
    )
    return CheckpointInfo(
        path=index.root,
        kind=index.kind,
        version=index.version,
        tensors=len(index.tensors),
        aliases=len(index.aliases),
        nbytes=index.nbytes,
        dtypes=MappingProxyType({k: DtypeSummary(c, n) for k, (c, n) in by_size}),
        partitions=tuple(PartitionSummary(p.file, p.nbytes, p.device) for p in index.partitions),
        alignment=index.alignment,
        checksum=checksum,
        source=index.source,
        metadata=index.metadata,
        files=index.files,
        tree=index.tree,
    )


__all__ = ["CheckpointInfo", "DtypeSummary", "PartitionSummary", "info"]
