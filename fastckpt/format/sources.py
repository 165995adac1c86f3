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

Discovery only: safetensors and fastckpt sources become byte ranges of their files
(``format.stored``), PyTorch files are read by ``format.torchfile``.

In a directory, every other top-level regular file (configs, tokenizer files, ...) is carried
over verbatim (symbolic links followed, as in a Hugging Face cache snapshot); other weight files,
hidden files and sub-directories are not.
"""

from __future__ import annotations

import errno
import json
import os
import warnings

from fastckpt.errors import SourceError, UnsafePathError
from fastckpt.format import spec
from fastckpt.format.fsdir import CheckpointDir
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint
from fastckpt.format.stored import FileCache, Source, range_source
from fastckpt.format.torchfile import TORCH_SUFFIXES, torch_source
from fastckpt.rules.carried import is_carried_name, is_weight_file

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


def open_source(src: str | os.PathLike[str]) -> Source:
    """Inspect ``src`` and return the matching ``Source`` (``SourceError`` when none matches)."""
    path = os.path.abspath(os.fspath(src))
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "conversion source not found", path)
    if os.path.isdir(path):
        return _open_dir(path)
    return _open_file(path)


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
        return torch_source([path], kind="torch", root=path)
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
    with CheckpointDir(path) as d:
        return _open_dir_beneath(d)


def _open_dir_beneath(d: CheckpointDir) -> Source:
    path = d.path
    has = d.has

    def confined(name: str) -> str:
        """The path of weights file ``name``, after checking it resolves beneath ``d``."""
        d.open(name, error=SourceError, what="weights file").close()
        return d.join(name)

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
        weights = confined(adapter)
        if adapter.endswith(".safetensors"):
            source = _safetensors_source(weights, kind="peft", root=path)
        else:
            source = torch_source([weights], kind="peft", root=path)
        return _with_carried(source, d)

    kind = "transformers" if has("config.json") else "directory"
    entries = d.listdir()
    st_indexes = [n for n in entries if n.endswith(spec.SAFETENSORS_INDEX_SUFFIX) and has(n)]
    st_files = [n for n in entries if n.endswith(".safetensors") and not n.startswith(".")]
    st_files = [n for n in st_files if has(n)]
    if has("model.safetensors.index.json"):
        source = _safetensors_source(d.join("model.safetensors.index.json"), kind=kind, root=path)
    elif has("model.safetensors"):
        source = _safetensors_source(d.join("model.safetensors"), kind=kind, root=path)
    elif has("pytorch_model.bin.index.json"):
        shards, weight_map = _torch_shards(d.join("pytorch_model.bin.index.json"))
        for shard in shards:
            confined(os.path.basename(shard))
        source = torch_source(shards, kind=kind, root=path, weight_map=weight_map)
    elif has("pytorch_model.bin"):
        source = torch_source([confined("pytorch_model.bin")], kind=kind, root=path)
    elif len(st_indexes) == 1:
        source = _safetensors_source(d.join(st_indexes[0]), kind=kind, root=path)
    elif not st_indexes and len(st_files) == 1:
        source = _safetensors_source(d.join(st_files[0]), kind=kind, root=path)
    elif not st_indexes and st_files:
        # Shards without an index json: every *.safetensors file is a shard (as ``load`` reads
        # the directory); tensor names must be unique across them.
        source = _safetensors_source(path, kind=kind, root=path)
    else:
        detail = f"; found several index files: {', '.join(st_indexes)}" if st_indexes else ""
        raise SourceError(
            f"no model weights found in directory: looked for {', '.join(LOOKED_FOR)}{detail}",
            path=path,
        )
    return _with_carried(source, d)


def _with_carried(source: Source, d: CheckpointDir) -> Source:
    """Add every top-level non-weight regular file of ``d`` to ``source.files``, opened beneath
    the directory (a symbolic link leading outside raises ``UnsafePathError``)."""
    carried: list[tuple[str, str]] = []
    for name in d.listdir():
        full = d.join(name)
        if not is_carried_name(name) or d.is_dir(name):
            continue
        if name.startswith("part-") and name.endswith(".fckpt"):
            continue
        try:
            spec.check_file_name(name, path=full)
        except UnsafePathError as exc:  # pragma: no cover - needs an odd file name on disk
            warnings.warn(f"not carrying {full!r}: {exc}", stacklevel=3)
            continue
        try:
            f = d.open(name, error=SourceError, what="carried file")
        except SourceError:
            continue  # a FIFO, socket or device: not a file to carry
        except FileNotFoundError:
            continue  # a dangling link
        source.file_fds[name] = f.fd
        carried.append((name, full))
    source.files = carried
    _with_tree(source, d)
    return source


def _with_tree(source: Source, d: CheckpointDir) -> None:
    """Add the non-weight files of ``d``'s sub-folders (sentence-transformers modules such as
    ``1_Pooling/config.json``, processor folders, custom code) as the carried ``tree``, with the
    format's confinement rules: opened beneath the directory, hidden entries and weights
    skipped, folder links not entered, at most ``spec.MAX_TREE_DEPTH`` folders deep."""

    def skip(name: str) -> bool:
        return not is_carried_name(name)

    for rel in d.walk_files(max_depth=spec.MAX_TREE_DEPTH, skip=skip):
        try:
            spec.check_tree_path(rel, path=d.join(rel))
        except UnsafePathError as exc:  # pragma: no cover - needs an odd file name on disk
            warnings.warn(f"not carrying {d.join(rel)!r}: {exc}", stacklevel=4)
            continue
        try:
            f = d.open(rel, error=SourceError, what="carried file")
        except (SourceError, FileNotFoundError):
            continue  # not a regular file, or a dangling link
        source.tree[rel] = f.fd


# --- safetensors and fastckpt (byte ranges) ------------------------------------------------------


def _adopt(ck: OpenCheckpoint, files: FileCache) -> None:
    """Read the partitions through the descriptors they were validated with."""
    for part, f in zip(ck.index.partitions, ck.partitions, strict=True):
        files.adopt(part.path, os.dup(f.fd))


def _safetensors_source(weights: str, *, kind: str, root: str) -> Source:
    files = FileCache()
    with open_checkpoint(weights) as ck:
        _adopt(ck, files)
        index = ck.index
    source = range_source(index, kind=kind, root=root, files=files)
    shards = [p.file for p in index.partitions]
    source.provenance = {"kind": kind, "path": root, "format": "safetensors", "weights": shards}
    return source


def _fastckpt_source(root: str) -> Source:
    files = FileCache()
    with open_checkpoint(root) as ck:
        _adopt(ck, files)
        index = ck.index
        fds = {name: os.dup(f.fd) for name, f in ck.carried.items()}
    source = range_source(index, kind="fastckpt", root=root, files=files)
    source.files = [(name, os.path.join(root, name)) for name in index.files]
    source.file_fds = {name: fds.pop(name) for name in index.files}
    source.tree = fds  # what remains: the files in sub-folders
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


__all__ = ["LOOKED_FOR", "Source", "is_weight_file", "open_source"]
