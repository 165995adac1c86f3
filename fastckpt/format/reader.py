"""``read_index``: turn any supported checkpoint into a validated ``Index``. Imports no torch.

Accepted paths (see FORMAT.md, sections 6 and 7):

- a fastckpt directory (holding ``fastckpt.index``) or the index file itself;
- one ``.safetensors`` file;
- a directory with a ``*.safetensors.index.json`` (sharded, transformers style), or with
  ``*.safetensors`` files and no index json; or the index json itself.

Every file a checkpoint names is opened beneath its directory (``fsdir``, FORMAT.md section 8);
``open_checkpoint`` keeps those files open for a reader that must read exactly what was validated.
The fastckpt index itself is validated by ``fastckpt_index``, safetensors headers by
``safetensors``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from fastckpt.errors import (
    CorruptIndexError,
    MissingPartitionError,
    SourceError,
    TruncatedError,
)
from fastckpt.format import safetensors, spec
from fastckpt.format.fastckpt_index import read_fastckpt
from fastckpt.format.fsdir import CheckpointDir, Dir, FileSet, OpenedFiles, OpenFile, open_path
from fastckpt.format.index import Index


class OpenCheckpoint:
    """A validated ``index`` plus the open files it was validated against.

    ``partitions[i]`` is the open file of ``index.partitions[i]`` (regular, opened beneath the
    checkpoint directory, its size checked against the index); ``carried`` maps each carried
    file's name to its open file. Reading through these descriptors, never through paths, is
    what makes a load a consistent snapshot: a directory republished meanwhile is not mixed in.
    Close it (or use it as a context manager) when done.
    """

    def __init__(
        self, index: Index, partitions: tuple[OpenFile, ...], carried: Mapping[str, OpenFile]
    ) -> None:
        self.index = index
        self.partitions = partitions
        self.carried = dict(carried)

    def close(self) -> None:
        for f in self.partitions:
            f.close()
        for f in self.carried.values():
            f.close()
        self.partitions = ()
        self.carried = {}

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_partitions(index: Index) -> tuple[OpenFile, ...]:
    """Open the partitions of an already validated ``index`` again, with the same rules
    (beneath the directory, regular, the size the index records). For callers that hold an
    ``Index`` but not its ``OpenCheckpoint``; those get no snapshot guarantee across the two."""
    out: list[OpenFile] = []
    try:
        single = len(index.partitions) == 1 and index.source.get("path") == index.partitions[0].path
        if index.kind == "safetensors" and single:
            part = index.partitions[0]
            out.append(open_path(part.path, error=MissingPartitionError, what="safetensors file"))
        else:
            with CheckpointDir(index.root) as d:
                for part in index.partitions:
                    try:
                        out.append(d.open(part.file, error=MissingPartitionError, what="partition"))
                    except FileNotFoundError:
                        raise MissingPartitionError(
                            "partition file is missing", path=part.path
                        ) from None
        for part, f in zip(index.partitions, out, strict=True):
            if f.size != part.nbytes:
                cls = TruncatedError if f.size < part.nbytes else CorruptIndexError
                raise cls(
                    f"partition file is {f.size} bytes; the index says {part.nbytes} (it "
                    "changed after the index was read)",
                    path=part.path,
                )
    except BaseException:
        for f in out:
            f.close()
        raise
    return tuple(out)


def _fspath(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    raw = os.fspath(path)
    return os.path.abspath(os.fsdecode(raw))


def read_index(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> Index:
    """Read and fully validate the index of the checkpoint at ``path``.

    Raises a ``FormatError`` subclass for a malformed checkpoint, ``SourceError`` for a path that
    holds no checkpoint this reader knows, and ``FileNotFoundError`` for a path that does not
    exist.
    """
    with open_checkpoint(path) as ck:
        return ck.index


def open_checkpoint(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
) -> OpenCheckpoint:
    """``read_index``, keeping the validated files open (``OpenCheckpoint``).

    Every file the checkpoint names is opened beneath its directory (``fastckpt.format.fsdir``):
    opened once, never through a symbolic link that leaves the directory, never blocking, a
    regular file of the size the index records.
    """
    p = _fspath(path)
    opened = OpenedFiles()
    try:
        index = _read_path(p, opened)
        out = OpenCheckpoint(index, tuple(opened.partitions), opened.carried)
    except BaseException:
        opened.close()
        raise
    opened.release()
    return out


def open_file_set(files: FileSet, name: str = "") -> OpenCheckpoint:
    """``open_checkpoint`` for files already open (``FileSet``): the whole set as a checkpoint
    directory, or, with ``name``, that one file of it (a ``.safetensors`` file, an index json,
    a fastckpt index). The same validation as for a local checkpoint; the result's files are
    duplicates the caller closes with it."""
    opened = OpenedFiles()
    try:
        if not name:
            index = _read_directory(files, opened)
        elif name == spec.INDEX_FILE:
            index = read_fastckpt(files, opened)
        elif name.endswith(spec.SAFETENSORS_INDEX_SUFFIX):
            index_file = opened.keep(files.open(name, error=CorruptIndexError, what="index json"))
            index = safetensors.read_sharded(files, index_file, opened.partitions, carried=False)
        else:
            f = files.open(name, error=MissingPartitionError, what="safetensors file")
            opened.partitions.append(f)
            index = safetensors.read_files(files.path, [(name, f)], source=files.join(name))
        out = OpenCheckpoint(index, tuple(opened.partitions), opened.carried)
    except BaseException:
        opened.close()
        raise
    opened.release()
    return out


def _read_path(p: str, opened: OpenedFiles) -> Index:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint", p) from None
    except NotADirectoryError:
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint", p) from None
    if stat.S_ISDIR(st.st_mode):
        return _read_directory(opened.dir(p), opened)
    name = os.path.basename(p)
    parent = os.path.dirname(p)
    if name == spec.INDEX_FILE:
        return read_fastckpt(opened.dir(parent), opened)
    if name.endswith(spec.SAFETENSORS_INDEX_SUFFIX):
        index_file = opened.keep(open_path(p, error=CorruptIndexError, what="index json"))
        return safetensors.read_sharded(opened.dir(parent), index_file, opened.partitions)
    if name.endswith(".safetensors"):
        return _read_one_safetensors(p, opened)
    # Another name: recognise the content.
    if stat.S_ISREG(st.st_mode):
        f = open_path(p, error=SourceError, what="checkpoint file")
        try:
            head = os.pread(f.fd, 64, 0)
        finally:
            f.close()
        if head[:8] == spec.MAGIC:
            return read_fastckpt(opened.dir(parent), opened, index_name=name)
        if safetensors.looks_like_safetensors(head):
            return _read_one_safetensors(p, opened)
    raise SourceError(
        "not a checkpoint fastckpt can read: expected a fastckpt directory or index, a "
        ".safetensors file, or a directory of safetensors shards (convert other formats with "
        "`fastckpt convert`)",
        path=p,
    )


def _read_one_safetensors(p: str, opened: OpenedFiles) -> Index:
    try:
        f = open_path(p, error=MissingPartitionError, what="safetensors file")
    except FileNotFoundError:  # pragma: no cover - removed since the stat
        raise MissingPartitionError("safetensors file is missing", path=p) from None
    opened.partitions.append(f)
    return safetensors.read_files(os.path.dirname(p), [(os.path.basename(p), f)], source=p)


def _read_directory(d: Dir, opened: OpenedFiles) -> Index:
    root = d.path
    if d.exists(spec.INDEX_FILE):
        return read_fastckpt(d, opened)
    names = d.listdir()
    index_jsons = [n for n in names if n.endswith(spec.SAFETENSORS_INDEX_SUFFIX)]
    if index_jsons:
        preferred = "model" + spec.SAFETENSORS_INDEX_SUFFIX
        if preferred in index_jsons:
            chosen = preferred
        elif len(index_jsons) == 1:
            chosen = index_jsons[0]
        else:
            raise SourceError(
                f"directory holds several safetensors index files ({', '.join(index_jsons)}) and "
                f"no {preferred}; pass the one to read",
                path=root,
            )
        index_file = opened.keep(d.open(chosen, error=CorruptIndexError, what="index json"))
        return safetensors.read_sharded(d, index_file, opened.partitions)
    shards = [n for n in names if n.endswith(".safetensors") and not n.startswith(".")]
    shards = [n for n in shards if d.has(n)]
    if shards:
        files: list[tuple[str, OpenFile]] = []
        for n in shards:
            f = safetensors.open_shard(d, n)
            opened.partitions.append(f)
            files.append((n, f))
        return safetensors.read_files(
            root, files, carried=safetensors.carried_files(d), source=root
        )
    raise SourceError(
        f"directory holds no {spec.INDEX_FILE} and no .safetensors files; convert other "
        "formats (.bin/.pt/.pth) with `fastckpt convert`",
        path=root,
    )


# --- the fastckpt index -------------------------------------------------------------------------


def read_fastckpt_index(index_path: str) -> Index:
    """Read and validate a ``fastckpt.index`` file (FORMAT.md section 6, steps 1–22)."""
    index_path = os.path.abspath(index_path)
    with open_checkpoint(index_path) as ck:
        return ck.index


__all__ = [
    "OpenCheckpoint",
    "open_checkpoint",
    "open_file_set",
    "open_partitions",
    "read_fastckpt_index",
    "read_index",
]
