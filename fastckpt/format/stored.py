"""The stored-tensor model: what a writer stores and where its bytes come from. No torch at import.

A ``StoredTensor`` knows its name, dtype, shape and size and streams exactly ``nbytes`` bytes into
a ``ByteSink`` (the writer's partition file). Two kinds exist:

- ``FileRange``: a byte range of a source file (safetensors shards, fastckpt partitions, records
  of a PyTorch zip archive), copied with ``pread`` straight into the sink's buffer;
- ``TorchTensor``: a torch tensor (any device, any strides), copied to host memory only when
  written.

A ``Source`` is what a conversion reads: stored tensors in source order, aliases, metadata and
carried files. ``state_dict_tensors`` turns a state dict into stored tensors plus aliases.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastckpt.errors import TruncatedError
from fastckpt.format import dtypes, spec
from fastckpt.format.index import Index

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ByteSink(Protocol):
    """Where a stored tensor writes its bytes (``writer.PartitionWriter``)."""

    def write(self, data: memoryview) -> None: ...

    def space(self) -> memoryview: ...

    def commit(self, nbytes: int) -> None: ...


class StoredTensor:
    """One tensor to store: metadata plus a way to stream exactly ``nbytes`` bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def write_to(self, out: ByteSink) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class FileCache:
    """Read-only file descriptors shared by the ``FileRange`` items of one conversion.

    Descriptors handed in with ``adopt`` (opened beneath a checkpoint directory by
    ``fastckpt.format.fsdir``) are used as they are; other paths are opened on first use.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def adopt(self, path: str, fd: int) -> None:
        """Use (and later close) ``fd`` for ``path``."""
        old = self._fds.get(path)
        if old is not None and old != fd:
            os.close(old)
        self._fds[path] = fd

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[path] = fd
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # pragma: no cover - non-Linux
    view[: len(data)] = data  # pragma: no cover
    return len(data)  # pragma: no cover


class FileRange(StoredTensor):
    """A tensor whose bytes are a byte range of a file (safetensors shards, fastckpt partitions).

    Copied with ``os.preadv`` straight into the write buffer: no torch, no extra copy.
    """

    def __init__(
        self,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        nbytes: int,
        *,
        files: FileCache,
        path: str,
        offset: int,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self._files = files
        self.path = path
        self.offset = offset

    def write_to(self, out: ByteSink) -> None:
        fd = self._files.fd(self.path)
        pos = self.offset
        remaining = self.nbytes
        while remaining:
            room = out.space()
            view = room[: min(len(room), remaining)]
            got = _pread_into(fd, view, pos)
            if got == 0:
                raise TruncatedError(
                    f"source file ended while reading {self.nbytes} bytes at offset {self.offset}"
                    " (was it changed during the conversion?)",
                    path=self.path,
                    tensor=self.name,
                    offset=pos,
                )
            out.commit(got)
            pos += got
            remaining -= got


class TorchTensor(StoredTensor):
    """A torch tensor (any device, any strides); copied to host memory only when written."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self.tensor = tensor
        self.dtype = dtypes.name_of(tensor.dtype, tensor=name)
        self.shape = tuple(int(d) for d in tensor.shape)
        self.nbytes = tensor.numel() * dtypes.get(self.dtype).itemsize

    def write_to(self, out: ByteSink) -> None:
        if self.nbytes == 0:
            return
        import torch

        t = self.tensor.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous().reshape(-1).view(torch.uint8)
        data = t.numpy().data
        if len(data) != self.nbytes:
            raise AssertionError(f"{self.name}: {len(data)} bytes, expected {self.nbytes}")
        out.write(data)


@dataclass
class Source:
    """What a conversion reads: tensors (in source order), aliases, metadata, carried files.

    ``files`` are ``(name, path)`` pairs; a carried file already opened safely (beneath its
    directory, regular, non-blocking) is in ``file_fds`` under its name. ``tree`` maps carried
    files in sub-folders (``a/b.json``) to their open descriptors.
    """

    kind: str
    path: str
    tensors: list[StoredTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    file_fds: dict[str, int] = field(default_factory=dict)
    tree: dict[str, int] = field(default_factory=dict)
    _files: FileCache | None = None
    _keep: list[Any] = field(default_factory=list)

    def close(self) -> None:
        """Release open files and memory-mapped tensors."""
        if self._files is not None:
            self._files.close()
        fds, self.file_fds = self.file_fds, {}
        tree, self.tree = self.tree, {}
        for fd in (*fds.values(), *tree.values()):
            os.close(fd)
        self._keep.clear()
        self.tensors = []

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def range_source(index: Index, *, kind: str, root: str, files: FileCache) -> Source:
    """A ``Source`` whose tensors are byte ranges of the partitions of a validated ``index``."""
    tensors: list[StoredTensor] = []
    for entry in index.tensors.values():
        part = index.partitions[entry.partition]
        tensors.append(
            FileRange(
                entry.name,
                entry.dtype,
                tuple(entry.shape),
                entry.nbytes,
                files=files,
                path=part.path,
                offset=entry.offset,
            )
        )
    return Source(
        kind=kind,
        path=root,
        tensors=tensors,
        aliases=dict(index.aliases),
        metadata={str(k): str(v) for k, v in index.metadata.items()},
        _files=files,
    )


def check_tensor_name(name: object) -> str:
    """A user-supplied tensor name: ``TypeError`` for a non-string, else the format's one name
    rule (``spec.check_tensor_name``: ``InvalidNameError``, a ``ValueError``)."""
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings, got {type(name).__name__} {name!r}")
    return spec.check_tensor_name(name, path=None)


def state_dict_tensors(
    state_dict: Mapping[str, torch.Tensor], *, what: str = "state_dict"
) -> tuple[list[StoredTensor], dict[str, str]]:
    """Turn a state dict into stored tensors plus aliases.

    Entries that are the same view of the same storage (same storage, offset, shape, strides,
    dtype; tied weights) are stored once and the later names recorded as aliases. Other views of
    a shared storage are stored as separate contiguous copies.
    """
    import torch

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{what} must be a mapping of str to torch.Tensor, got {type(state_dict)}")
    items: list[StoredTensor] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state_dict.items():
        check_tensor_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{what}[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor; fastckpt "
                "stores tensors only"
            )
        if tensor.layout != torch.strided:
            raise ValueError(
                f"{what}[{name!r}] has layout {tensor.layout}; only dense (strided) tensors can "
                "be stored (call .to_dense() first)"
            )
        if tensor.is_meta:
            raise ValueError(f"{what}[{name!r}] is on the meta device and holds no data")
        if tensor.is_quantized:
            raise ValueError(
                f"{what}[{name!r}] is a quantized tensor ({tensor.dtype}); store its "
                "int representation and scales as plain tensors instead"
            )
        item = TorchTensor(name, tensor)
        if tensor.numel() > 0:
            key: tuple[Any, ...] = (
                str(tensor.device),
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
                tensor.is_conj(),
                tensor.is_neg(),
            )
        else:
            key = ("empty", id(tensor))
        target = seen.get(key)
        if target is not None:
            aliases[name] = target
            continue
        seen[key] = name
        items.append(item)
    return items, aliases


__all__ = [
    "ByteSink",
    "FileCache",
    "FileRange",
    "Source",
    "StoredTensor",
    "TorchTensor",
    "check_tensor_name",
    "range_source",
    "state_dict_tensors",
]
