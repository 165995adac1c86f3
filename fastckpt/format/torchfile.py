"""PyTorch state-dict files as conversion sources: ``torch_source`` and its helpers.

Files are read with ``torch.load(weights_only=True)``, so no arbitrary object is ever unpickled.
A zip-format file is memory-mapped, and its contiguous tensors then become byte ranges of the
file (``FileRange``: copied with ``pread``, so the mapping's pages are never touched and never
count as resident memory). Other tensors (legacy format, non-contiguous views) are copied through
torch one at a time. torch is imported when a function here is called, never at import.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

from fastckpt.errors import FormatError, SourceError
from fastckpt.format.stored import (
    FileCache,
    FileRange,
    Source,
    StoredTensor,
    TorchTensor,
    state_dict_tensors,
)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unsupported_global(exc: BaseException) -> str | None:
    """The 'Unsupported global: GLOBAL x.Y' part of a weights_only refusal, if that is why.

    (Older torch releases say 'Unsupported class x.Y'.)
    """
    for line in str(exc).splitlines():
        for marker in ("Unsupported global", "Unsupported class"):
            at = line.find(marker)
            if at >= 0:
                return line[at:].split(" was not an allowed global")[0].strip()
    return None


def _unpickler_detail(exc: BaseException) -> str:
    """What torch's weights-only unpickler said ('Unsupported operand 149', ...), without
    torch's advice to re-run with weights_only=False."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(exc), re.S)
    return " ".join(m.group(1).split()) if m else _first_line(exc)


def _has_compressed_records(path: str) -> bool:
    """Does the zip archive hold any compressed (e.g. DEFLATE) record? torch's memory-mapped
    load would hand out the compressed bytes of such a record as tensor data."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
    except (OSError, zipfile.BadZipFile):
        return False


def torch_load_state_dict(path: str) -> Mapping[str, Any]:
    """``torch.load(weights_only=True)``, memory-mapped for zip-format files."""
    import torch

    try:
        if zipfile.is_zipfile(path) and not _has_compressed_records(path):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _unsupported_global(exc)
        if what is None:
            raise SourceError(
                "not a readable PyTorch checkpoint (torch.load(weights_only=True) refused it: "
                f"{_unpickler_detail(exc)}); fastckpt will not unpickle it otherwise",
                path=path,
            ) from None
        raise SourceError(
            f"refusing to load: the file holds objects other than tensors ({what}); "
            "fastckpt reads PyTorch files with torch.load(weights_only=True) only and will not "
            "unpickle arbitrary objects. Re-save it as a flat dict of tensors with torch.save.",
            path=path,
        ) from None
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise SourceError(f"not a readable PyTorch checkpoint ({exc})", path=path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ... for junk
        raise SourceError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})",
            path=path,
        ) from None
    if not isinstance(obj, Mapping):
        raise SourceError(
            f"holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)",
            path=path,
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise SourceError(f"state dict key {key!r} is not a string", path=path)
        if not isinstance(value, torch.Tensor):
            hint = (
                " (a nested dict: pass the inner state dict, e.g. obj['state_dict'])"
                if isinstance(value, Mapping)
                else ""
            )
            raise SourceError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor{hint}",
                path=path,
                tensor=key,
            )
    return obj


def torch_source(
    paths: list[str], *, kind: str, root: str, weight_map: Mapping[str, str] | None = None
) -> Source:
    """A ``Source`` over the PyTorch state-dict files ``paths`` (shards of one model).

    ``weight_map`` (from a ``pytorch_model.bin.index.json``): tensor name -> shard path; every
    entry must match where the tensor was found.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    keep: list[Any] = []
    bases: dict[str, int | None] = {}
    for p in paths:
        sd = torch_load_state_dict(p)
        keep.append(sd)
        bases[p] = _mapping_base(p, sd.values()) if zipfile.is_zipfile(p) else None
        for name, tensor in sd.items():
            if name in merged:
                raise SourceError(
                    f"tensor {name!r} appears in two shards ({os.path.basename(origin[name])} "
                    f"and {os.path.basename(p)})",
                    path=p,
                    tensor=name,
                )
            merged[name] = tensor
            origin[name] = p
    for name, shard in (weight_map or {}).items():
        if origin.get(name) != shard:
            where = f"is in {os.path.basename(origin[name])}" if name in origin else "is missing"
            raise SourceError(
                f"the shard index puts tensor {name!r} in {os.path.basename(shard)}, but it "
                f"{where}",
                path=root,
                tensor=name,
            )
    try:
        tensors, aliases = state_dict_tensors(merged, what="source")
    except FormatError as exc:
        raise SourceError(exc.message, path=exc.path or root, tensor=exc.tensor) from None
    except (TypeError, ValueError) as exc:
        raise SourceError(str(exc), path=root) from None
    files = FileCache()
    tensors = [_as_file_range(t, origin, bases, files) for t in tensors]
    weights = [os.path.basename(p) for p in paths]
    return Source(
        kind=kind,
        path=root,
        tensors=tensors,
        aliases=aliases,
        provenance={"kind": kind, "path": root, "format": "torch", "weights": weights},
        _files=files,
        _keep=keep,
    )


_STORAGE_RECORD = re.compile(r"(?:^|/)data/[^/]+$")


def _zip_data_records(path: str) -> dict[int, int]:
    """Storage records (``<archive>/data/<key>``) of a torch zip file: data offset -> size."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.filename.endswith("/byteorder") and zf.read(info).strip() != b"little":
                return {}  # torch swaps big-endian data in memory; the file bytes would differ
            if not _STORAGE_RECORD.search(info.filename):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                return {}
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                return {}
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            out[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return out


def _mapping_base(path: str, tensors: Iterable[Any]) -> int | None:
    """Address of byte 0 of ``path`` in the mapping behind a ``torch.load(mmap=True)`` result.

    torch maps the whole zip file once and makes each storage a slice at its record's offset.
    Knowing where byte 0 lies lets the converter read tensor bytes with ``pread`` instead of
    touching the mapping (whose pages would count as this process's resident memory). The
    answer is only trusted when it is the one offset that puts every storage exactly on a
    storage record of its size; otherwise None (and tensors are copied through torch).
    """
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            storages[storage.data_ptr()] = storage.nbytes()
    if not storages:
        return None
    try:
        records = _zip_data_records(path)
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    first = min(storages)
    found = [
        first - offset
        for offset, size in records.items()
        if size == storages[first]
        and all(records.get(ptr - (first - offset)) == n for ptr, n in storages.items())
    ]
    return found[0] if len(found) == 1 else None


def _as_file_range(
    item: StoredTensor, origin: Mapping[str, str], bases: Mapping[str, int | None], files: FileCache
) -> StoredTensor:
    """A contiguous tensor of a memory-mapped zip file becomes a byte range of that file."""
    if not isinstance(item, TorchTensor) or item.nbytes == 0:
        return item
    path = origin[item.name]
    base = bases.get(path)
    t = item.tensor
    if base is None or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return item
    return FileRange(
        item.name,
        item.dtype,
        item.shape,
        item.nbytes,
        files=files,
        path=path,
        offset=t.data_ptr() - base,
    )


__all__ = ["TORCH_SUFFIXES", "torch_load_state_dict", "torch_source"]
