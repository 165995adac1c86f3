"""The validated index: what every reader of a checkpoint works from. Imports no torch.

``fastckpt.format.read_index(path)`` returns an ``Index`` for any supported checkpoint (a
fastckpt directory, one ``.safetensors`` file, a sharded safetensors directory). The loader, the
planner and ``sched`` never look at files themselves: an ``Index`` has been fully validated
(bounds, overlaps, dtype sizes, partition sizes) before it is returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

IndexKind = Literal["fastckpt", "safetensors"]


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor.

    ``offset`` is the absolute byte offset of the tensor's first byte in its partition file;
    ``nbytes == itemsize(dtype) * prod(shape)``. Bytes are C-contiguous, little-endian.
    """

    name: str
    partition: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class PartitionEntry:
    """One data file.

    Attributes:
        file: the file name relative to the checkpoint root (no directories for fastckpt).
        path: the absolute path of the file.
        nbytes: the file's size as recorded/validated (fastckpt: padded to 4 KiB).
        data_start, data_end: the byte range that holds tensor data (safetensors: after the
            header). Every tensor lies inside it.
        device: the device this partition's tensors were grouped for by a device map, or None.
        checksums: CRC32C of each ``checksum_chunk_bytes`` chunk of the file, from offset 0 to
            ``nbytes`` (the last chunk may be short), or None when the source has none.
    """

    file: str
    path: str
    nbytes: int
    data_start: int
    data_end: int
    device: str | None = None
    checksums: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Index:
    """A validated checkpoint index.

    ``tensors`` is ordered in load order (partition, then offset). ``aliases`` maps each alias
    name (a tied tensor stored once) to the canonical name stored in ``tensors``.
    """

    root: str
    kind: IndexKind
    version: tuple[int, int]
    tensors: Mapping[str, TensorEntry]
    partitions: tuple[PartitionEntry, ...]
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    alignment: int = 1
    checksum_algorithm: str | None = None
    checksum_chunk_bytes: int | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    source: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()
    tree: tuple[str, ...] = ()
    """Carried files in sub-folders (``1_Pooling/config.json``), ``/``-separated (format 1.1)."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (each stored tensor counted once)."""
        return sum(t.nbytes for t in self.tensors.values())

    def names(self) -> list[str]:
        """Every name a loaded state dict will hold: stored tensors, then aliases."""
        return [*self.tensors, *self.aliases]

    def entry(self, name: str) -> TensorEntry:
        """The stored entry for a tensor or alias name (KeyError if neither)."""
        return self.tensors[self.aliases.get(name, name)]
