"""Conversion sources: find the weights in a path and expose them as ``StoredTensor`` items.

Recognised layouts (``open_source`` checks in this order):

- a fastckpt checkpoint directory (re-partitioned; its carried files and aliases are kept);
- a peft LoRA adapter directory: ``adapter_model.safetensors`` or ``adapter_model.bin`` plus
  ``adapter_config.json``;
- a transformers model directory or plain weights directory: ``model.safetensors.index.json``,
  ``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin`` (or a single
  ``*.safetensors.index.json`` / ``*.safetensors`` file);
- a single ``.safetensors`` file;
- a single PyTorch ``.bin`` / ``.pt`` / ``.pth`` file holding a flat state dict.

safetensors and fastckpt sources are copied as byte ranges (no torch). PyTorch files are read
with ``torch.load(weights_only=True)``, so no arbitrary object is ever unpickled; a zip-format
file is memory-mapped, and its contiguous tensors are then copied as byte ranges of the file too
(``pread``: the mapping's pages are never touched, so they never count as resident memory).
Other tensors (legacy format, non-contiguous views) are copied through torch one at a time.

In a directory, every other top-level regular file (configs, tokenizer files, ...) is carried
over verbatim (symbolic links followed, as in a Hugging Face cache snapshot); other weight files,
hidden files and sub-directories are not.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FormatError, SourceError, TruncatedError, UnsafePathError
from fastckpt.format import dtypes, spec
from fastckpt.rules.carried import is_carried_name, is_weight_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.writer import PartitionWriter

TORCH_SUFFIXES = (".bin", ".pt", ".pth")

LOOKED_FOR = (
    spec.INDEX_FILE,
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "*.safetensors.index.json",
    "*.safetensors",
)


@dataclass
class Source:
    """What a conversion reads: tensors (in source order), aliases, metadata, carried files."""

    kind: str
    path: str
    tensors: list[StoredTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    _files: FileCache | None = None
    _keep: list[Any] = field(default_factory=list)

    def close(self) -> None:
        """Release open files and memory-mapped tensors."""
        if self._files is not None:
            self._files.close()
        self._keep.clear()
        self.tensors = []

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(src: str | os.PathLike[str]) -> Source:
    """Inspect ``src`` and return the matching ``Source`` (``SourceError`` when none matches)."""
    path = os.path.abspath(os.fspath(src))
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "conversion source not found", path)
    if os.path.isdir(path):
        return _open_dir(path)
    return _open_file(path)


# --- what gets stored ---------------------------------------------------------------------------


class StoredTensor:
    """One tensor to store: metadata plus a way to stream exactly ``nbytes`` bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def write_to(self, out: PartitionWriter) -> None:  # pragma: no cover - interface
        raise NotImplementedError


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

    def write_to(self, out: PartitionWriter) -> None:
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


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # pragma: no cover - non-Linux
    view[: len(data)] = data  # pragma: no cover
    return len(data)  # pragma: no cover


class FileCache:
    """Read-only file descriptors shared by the ``FileRange`` items of one conversion."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

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


class TorchTensor(StoredTensor):
    """A torch tensor (any device, any strides); copied to host memory only when written."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self.tensor = tensor
        self.dtype = dtypes.name_of(tensor.dtype, tensor=name)
        self.shape = tuple(int(d) for d in tensor.shape)
        self.nbytes = tensor.numel() * dtypes.get(self.dtype).itemsize

    def write_to(self, out: PartitionWriter) -> None:
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


# --- state dicts --------------------------------------------------------------------------------


def check_tensor_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError("tensor name is empty; the format requires non-empty names")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tensor name {name!r} is not valid UTF-8") from None
    return name


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


# --- single files -------------------------------------------------------------------------------


def _sniff(path: str) -> str | None:
    """Guess a file's kind from its first bytes (for names without a known suffix)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(spec.MAGIC):
        return "fastckpt-index"
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80":  # pickle protocol 2+ (legacy torch.save)
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _open_file(path: str) -> Source:
    lower = path.lower()
    if lower.endswith(".safetensors"):
        kind: str | None = "safetensors"
    elif lower.endswith(TORCH_SUFFIXES):
        kind = "torch"
    else:
        kind = _sniff(path)
    if kind == "safetensors":
        return _safetensors_source(path, kind="safetensors", root=path)
    if kind == "torch":
        return _torch_source([path], kind="torch", root=path)
    if kind == "fastckpt-index":
        raise SourceError(
            "this is a fastckpt index file; pass the checkpoint directory instead", path=path
        )
    raise SourceError(
        "not a recognised checkpoint file: expected a .safetensors file or a PyTorch "
        f"{'/'.join(TORCH_SUFFIXES)} state dict",
        path=path,
    )


# --- directories --------------------------------------------------------------------------------


def _open_dir(path: str) -> Source:
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(path, name))

    if has(spec.INDEX_FILE):
        return _fastckpt_source(path)
    adapter = next(
        (n for n in ("adapter_model.safetensors", "adapter_model.bin") if has(n)),
        None,
    )
    if adapter is not None or has("adapter_config.json"):
        if adapter is None:
            raise SourceError(
                "peft adapter directory has adapter_config.json but no adapter_model.safetensors"
                " or adapter_model.bin",
                path=path,
            )
        if not has("adapter_config.json"):
            raise SourceError(
                f"peft adapter directory has {adapter} but no adapter_config.json", path=path
            )
        weights = os.path.join(path, adapter)
        if adapter.endswith(".safetensors"):
            source = _safetensors_source(weights, kind="peft", root=path)
        else:
            source = _torch_source([weights], kind="peft", root=path)
        return _with_carried(source, path)

    kind = "transformers" if has("config.json") else "directory"
    entries = sorted(os.listdir(path))
    st_indexes = [n for n in entries if n.endswith(spec.SAFETENSORS_INDEX_SUFFIX) and has(n)]
    st_files = [n for n in entries if n.endswith(".safetensors") and has(n)]
    if has("model.safetensors.index.json"):
        source = _safetensors_source(
            os.path.join(path, "model.safetensors.index.json"), kind=kind, root=path
        )
    elif has("model.safetensors"):
        source = _safetensors_source(os.path.join(path, "model.safetensors"), kind=kind, root=path)
    elif has("pytorch_model.bin.index.json"):
        shards, weight_map = _torch_shards(os.path.join(path, "pytorch_model.bin.index.json"))
        source = _torch_source(shards, kind=kind, root=path, weight_map=weight_map)
    elif has("pytorch_model.bin"):
        source = _torch_source([os.path.join(path, "pytorch_model.bin")], kind=kind, root=path)
    elif len(st_indexes) == 1:
        source = _safetensors_source(os.path.join(path, st_indexes[0]), kind=kind, root=path)
    elif not st_indexes and len(st_files) == 1:
        source = _safetensors_source(os.path.join(path, st_files[0]), kind=kind, root=path)
    else:
        found = st_indexes or st_files
        detail = f"; found several candidates: {', '.join(found)}" if len(found) > 1 else ""
        raise SourceError(
            f"no model weights found in directory: looked for {', '.join(LOOKED_FOR)}{detail}",
            path=path,
        )
    return _with_carried(source, path)


def _with_carried(source: Source, root: str) -> Source:
    """Add every top-level non-weight regular file of ``root`` to ``source.files``."""
    carried: list[tuple[str, str]] = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if not is_carried_name(name) or not os.path.isfile(full):
            continue
        if name.startswith("part-") and name.endswith(".fckpt"):
            continue
        try:
            spec.check_file_name(name, path=full)
        except UnsafePathError as exc:  # pragma: no cover - needs an odd file name on disk
            warnings.warn(f"not carrying {full!r}: {exc}", stacklevel=3)
            continue
        carried.append((name, full))
    source.files = carried
    return source


# --- safetensors and fastckpt (byte ranges) ------------------------------------------------------


def _read_index(path: str) -> Any:
    from fastckpt.format.reader import read_index

    return read_index(path)


def _range_source(index: Any, *, kind: str, root: str, files: FileCache) -> Source:
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


def _safetensors_source(weights: str, *, kind: str, root: str) -> Source:
    index = _read_index(weights)
    source = _range_source(index, kind=kind, root=root, files=FileCache())
    shards = [p.file for p in index.partitions]
    source.provenance = {"kind": kind, "path": root, "format": "safetensors", "weights": shards}
    return source


def _fastckpt_source(root: str) -> Source:
    index = _read_index(root)
    source = _range_source(index, kind="fastckpt", root=root, files=FileCache())
    source.files = [(name, os.path.join(root, name)) for name in index.files]
    source.provenance = {"kind": "fastckpt", "path": root, "source": dict(index.source)}
    return source


# --- PyTorch state dicts ------------------------------------------------------------------------


def _torch_shards(index_path: str) -> tuple[list[str], dict[str, str]]:
    """Shard paths of a ``pytorch_model.bin.index.json`` (first-use order) and its weight map."""
    try:
        with open(index_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"shard index is not valid JSON: {exc}", path=index_path) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError("shard index has no 'weight_map' object", path=index_path)
    root = os.path.dirname(index_path)
    shards: list[str] = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise SourceError(
                f"weight_map[{name!r}] is {shard!r}, not a file name", path=index_path
            )
        try:
            spec.check_file_name(shard, path=index_path)
        except UnsafePathError as exc:
            raise SourceError(f"shard {exc.message}", path=index_path) from None
        full = os.path.join(root, shard)
        if full not in shards:
            if not os.path.isfile(full):
                raise SourceError(f"shard {shard!r} named by the index is missing", path=index_path)
            shards.append(full)
    return shards, {str(k): os.path.join(root, v) for k, v in weight_map.items()}


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


def torch_load_state_dict(path: str) -> Mapping[str, Any]:
    """``torch.load(weights_only=True)``, memory-mapped for zip-format files."""
    import torch

    try:
        if zipfile.is_zipfile(path):
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
                f"not a readable PyTorch checkpoint (unpickling failed: {_first_line(exc)})",
                path=path,
            ) from None
        raise SourceError(
            f"refusing to load: the file holds objects other than tensors ({what}); fastckpt "
            "reads PyTorch files with torch.load(weights_only=True) and never unpickles "
            "arbitrary objects. Re-save it as a flat dict of tensors.",
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


def _torch_source(
    paths: list[str], *, kind: str, root: str, weight_map: Mapping[str, str] | None = None
) -> Source:
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


__all__ = [
    "LOOKED_FOR",
    "FileCache",
    "FileRange",
    "Source",
    "StoredTensor",
    "TorchTensor",
    "check_tensor_name",
    "is_weight_file",
    "open_source",
    "state_dict_tensors",
    "torch_load_state_dict",
]
