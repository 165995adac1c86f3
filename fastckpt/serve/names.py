"""Checkpoint names under the daemon's roots, and the identity of one generation on disk.

A client never sends a path: it sends the index of one of the daemon's roots and a name relative
to it. ``resolve`` refuses absolute names, ``..`` and ``.`` components, empty components, and
names whose real path (symlinks followed) leaves the root. ``identity`` fingerprints what a
checkpoint is made of right now (device, inode, size and mtime of the checkpoint path, its index
file and every partition), so a checkpoint republished on disk gets a new identity and is never
served mixed with the old one.

Pure Python: no torch, no C++ core.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from fastckpt.format.index import Index
from fastckpt.format.spec import INDEX_FILE

if TYPE_CHECKING:
    from fastckpt.format.reader import OpenCheckpoint


class NameError_(ValueError):
    """A checkpoint name is not acceptable (escapes the root, absolute, malformed)."""


def check_name(name: str) -> None:
    if not name or len(name) > 4096 or "\0" in name:
        raise NameError_("a checkpoint name must be a non-empty string without NUL bytes")
    if name.startswith("/"):
        raise NameError_(f"checkpoint name {name!r} is absolute; names are relative to a root")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise NameError_(f"checkpoint name {name!r} has an empty, '.' or '..' component")


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(root: str, name: str) -> str:
    """The real path of ``name`` under ``root`` (a real path itself); refuses escapes."""
    check_name(name)
    real = os.path.realpath(os.path.join(root, name))
    if not within(real, root) or real == root:
        raise NameError_(f"checkpoint name {name!r} resolves outside its root")
    return real


def split(roots: list[str], path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(root index, relative name) of ``path`` under one of ``roots`` (real paths), or None."""
    real = os.path.realpath(os.fspath(path))
    for i, root in enumerate(roots):
        if within(real, root) and real != root:
            return i, os.path.relpath(real, root)
    return None


def checkpoint_path(index: Index) -> str:
    """The path that names ``index``'s checkpoint to the daemon: the file itself for a single
    ``.safetensors`` file (whose ``root`` is the folder holding it), else its ``root``."""
    single = index.source.get("path")
    if (
        index.kind == "safetensors"
        and len(index.partitions) == 1
        and single == index.partitions[0].path
    ):
        return str(single)
    return index.root


def files_of(index: Index) -> list[str]:
    """Every file whose identity makes up the checkpoint: the path itself, the index, partitions."""
    out = [index.root]
    if index.kind == "fastckpt" and os.path.isdir(index.root):
        out.append(os.path.join(index.root, INDEX_FILE))
    out.extend(p.path for p in index.partitions)
    return out


# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): a file rewritten in place with its size
# and mtime restored still gets a new ctime (nobody but the kernel sets it)
FileStamp = tuple[int, int, int, int, int]


def stamp(st: os.stat_result) -> FileStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamps(index: Index) -> dict[str, FileStamp]:
    """The stamp of every file of ``index`` as it is on disk now (raises OSError if one is gone)."""
    return {path: stamp(os.stat(path)) for path in files_of(index)}


def identity(index: Index, stamped: dict[str, FileStamp] | None = None) -> str:
    """Fingerprint of the files of ``index`` (as stamped now, or as ``stamped`` says)."""
    stamped = stamps(index) if stamped is None else stamped
    h = hashlib.sha256()
    for path, st in sorted(stamped.items()):
        h.update(("\0".join([path, *map(str, st)]) + "\n").encode())
    return h.hexdigest()[:32]


class ChangedError(OSError):
    """The checkpoint changed on disk while its index was being read."""


def read_consistent(path: str) -> tuple[Index, dict[str, FileStamp]]:
    """``read_index(path)`` and the stamps of the files it came from, checked to belong together.

    A checkpoint republished while its index is read could otherwise pair an old index with new
    files. The checkpoint path and its index file are stamped before the read and must be
    unchanged after it; where the index lives in several files (sharded safetensors headers) the
    index is read a second time and the stamps must not move in between.
    """
    from fastckpt.format.reader import read_index

    before = _stamp_top(path)
    index = read_index(path)
    stamped = stamps(index)
    if any(stamped.get(p, st) != st for p, st in before.items()):
        raise ChangedError(f"{path} changed on disk while its index was read")
    if index.kind != "fastckpt" and len(index.partitions) > 1:
        again = read_index(path)
        if stamps(again) != stamped or again.tensors != index.tensors:
            raise ChangedError(f"{path} changed on disk while its index was read")
    return index, stamped


def _stamp_top(path: str) -> dict[str, FileStamp]:
    """Stamps of the checkpoint path and, for a directory, of its fastckpt index file (a single
    ``.safetensors`` file has none: ``NotADirectoryError`` is expected, not a failure)."""
    out = {}
    for p in (path, os.path.join(path, INDEX_FILE)):
        try:
            out[p] = stamp(os.stat(p))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out


def open_consistent(path: str) -> tuple[OpenCheckpoint, dict[str, FileStamp]]:
    """``open_checkpoint(path)`` (every file opened beneath the checkpoint's directory, Hugging
    Face cache snapshots and single files included, as a load opens them) and the stamps of its
    files: the partitions' from their open descriptors, so bytes read through those descriptors
    are the generation the stamps name. The checkpoint path and its index file must be the
    same before and after the open (``ChangedError`` otherwise). The caller closes the result.
    """
    from fastckpt.format.reader import open_checkpoint

    before = _stamp_top(path)
    ck = open_checkpoint(path)
    try:
        opened = {part.path: f for part, f in zip(ck.index.partitions, ck.partitions, strict=True)}
        stamped = {
            p: stamp(os.fstat(opened[p].fd)) if p in opened else stamp(os.stat(p))
            for p in files_of(ck.index)
        }
        after = _stamp_top(path)
        if any(after.get(p) != st or stamped.get(p, st) != st for p, st in before.items()):
            raise ChangedError(f"{path} changed on disk while its index was read")
    except BaseException:
        ck.close()
        raise
    return ck, stamped
