"""Read and validate a ``fastckpt.index`` (FORMAT.md sections 2 and 6). Imports no torch.

``read_fastckpt(d, opened)`` reads the index beneath the open checkpoint directory ``d`` and
validates it in the fixed order of FORMAT.md section 6, opening every partition and carried file
beneath ``d`` (their open files go to ``opened``). Every failure raises a specific
``fastckpt.errors.FormatError`` subclass naming the file, the tensor and the offset; nothing is
allocated from a size the file has not proven it holds. ``fastckpt.format.reader`` is the entry
point for every kind of checkpoint.
"""

from __future__ import annotations

import os
import threading
from types import MappingProxyType
from typing import Any

from fastckpt.errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    DtypeError,
    LimitError,
    MissingPartitionError,
    OutOfBoundsError,
    TruncatedError,
    UnsupportedVersionError,
)
from fastckpt.format import dtypes, spec
from fastckpt.format.fsdir import Dir, OpenedFiles
from fastckpt.format.index import Index, PartitionEntry, TensorEntry


def read_fastckpt(d: Dir, opened: OpenedFiles, index_name: str = spec.INDEX_FILE) -> Index:
    index_path = d.join(index_name)
    try:
        f = opened.keep(d.open(index_name, error=CorruptIndexError, what="index file"))
    except FileNotFoundError:
        raise CorruptIndexError("index file is missing", path=index_path) from None
    head = os.pread(f.fd, spec.HEADER_NBYTES, 0)
    header = _check_header(head, f.size, index_path)
    body = spec.pread_exact(
        f.fd, header.body_nbytes, spec.HEADER_NBYTES, path=index_path, what="index body"
    )
    actual = spec.crc32c(body)
    if actual != header.body_crc32c:
        raise ChecksumError(
            f"index body CRC32C is {actual:#010x}, the header says {header.body_crc32c:#010x}: "
            "the index is corrupted",
            path=index_path,
            offset=spec.HEADER_NBYTES,
            expected=header.body_crc32c,
            actual=actual,
        )
    key = (d.path, index_name, body)
    known = _VALIDATED.get(key)
    doc = (
        known.doc
        if known is not None
        else spec.loads_json(body, path=index_path, what="index body")
    )
    builder = _IndexBuilder(d, index_path, header, doc, opened)
    builder.known = known
    index = builder.build()
    if known is None:
        _remember(key, _Validated(doc, index))
    return index


class _Validated:
    """An index body already validated in this process, its parsed document and its ``Index``."""

    __slots__ = ("doc", "index")

    def __init__(self, doc: Any, index: Index) -> None:
        self.doc = doc
        self.index = index


# Index bodies already validated in this process, keyed by (directory, index name, the exact
# bytes): loading the same checkpoint again (a tier hit, the next window of ``iter_tensors``)
# skips the JSON parse and the per-tensor checks, which depend on nothing else, and gets the very
# same ``Index`` object (so plans made from it can be reused). Everything about the files
# (partitions opened beneath the directory, their sizes, carried files) is checked on every read.
_VALIDATED: dict[tuple[str, str, bytes], _Validated] = {}
_VALIDATED_MAX = 16
_validated_lock = threading.Lock()


def _remember(key: tuple[str, str, bytes], value: _Validated) -> None:
    with _validated_lock:
        _VALIDATED.pop(key, None)
        _VALIDATED[key] = value
        while len(_VALIDATED) > _VALIDATED_MAX:
            del _VALIDATED[next(iter(_VALIDATED))]


def _check_header(head: bytes, size: int, path: str) -> spec.Header:
    n = min(len(head), len(spec.MAGIC))
    if head[:n] != spec.MAGIC[:n]:
        raise BadMagicError(
            f"file starts with {spec.show(head[: len(spec.MAGIC)])}, not {spec.MAGIC!r}: it is "
            "not a fastckpt index",
            path=path,
            offset=0,
        )
    if size < spec.HEADER_NBYTES:
        raise TruncatedError(
            f"index file is {size} bytes; its header alone is {spec.HEADER_NBYTES}",
            path=path,
            offset=size,
        )
    header = spec.unpack_header(head)
    if header.major != spec.MAJOR:
        raise UnsupportedVersionError(
            f"index format version {header.major}.{header.minor}; this fastckpt reads "
            f"{spec.MAJOR}.x only (upgrade fastckpt, or convert the source again)",
            path=path,
            offset=8,
        )
    if header.flags != 0:
        raise CorruptIndexError(
            f"header flags = {header.flags:#x}; they must be 0 in version {spec.MAJOR}.x",
            path=path,
            offset=12,
        )
    if header.reserved != 0:
        raise CorruptIndexError(
            f"header reserved field = {header.reserved:#x}; it must be 0", path=path, offset=28
        )
    if header.body_nbytes > spec.MAX_BODY_NBYTES:
        raise LimitError(
            f"index body_nbytes = {header.body_nbytes}; the limit is {spec.MAX_BODY_NBYTES}",
            path=path,
            offset=16,
        )
    expected = spec.HEADER_NBYTES + header.body_nbytes
    if size < expected:
        raise TruncatedError(
            f"index file is {size} bytes; its header says {expected}",
            path=path,
            offset=size,
        )
    if size > expected:
        raise CorruptIndexError(
            f"index file is {size} bytes; its header says {expected} (trailing bytes)",
            path=path,
            offset=expected,
        )
    return header


_TENSOR_KEYS = frozenset(("name", "partition", "offset", "nbytes", "dtype", "shape"))


def _type_error(what: str, expected: str, value: object, path: str, tensor: str | None = None):
    return CorruptIndexError(
        f"{what} must be {expected}, got {type(value).__name__} {spec.show(value)}",
        path=path,
        tensor=tensor,
    )


class _IndexBuilder:
    """Validates a decoded index body step by step; ``build()`` returns the ``Index``."""

    def __init__(
        self, d: Dir, index_path: str, header: spec.Header, doc: Any, opened: OpenedFiles
    ) -> None:
        self.dir = d
        self.opened = opened
        self.path = index_path
        self.root = d.path
        self.header = header
        self.doc = doc
        self.known: _Validated | None = None

    def build(self) -> Index:
        doc = self._top_level()
        partitions = self._partitions(doc["partitions"])
        if self.known is not None:  # these very bytes were validated before: files checked
            self._tree(doc.get("tree", []), self._files(doc.get("files", []), partitions))
            return self.known.index
        tensors = self._tensors(doc["tensors"], partitions)
        aliases = self._aliases(doc.get("aliases", {}), tensors)
        files = self._files(doc.get("files", []), partitions)
        tree = self._tree(doc.get("tree", []), files)
        metadata = doc.get("metadata", {})
        return Index(
            root=self.root,
            kind="fastckpt",
            version=(self.header.major, self.header.minor),
            tensors=MappingProxyType(tensors),
            partitions=tuple(partitions),
            aliases=MappingProxyType(aliases),
            alignment=self.alignment,
            checksum_algorithm=spec.CHECKSUM_ALGORITHM,
            checksum_chunk_bytes=self.chunk_bytes,
            metadata=MappingProxyType(dict(metadata)),
            source=MappingProxyType(dict(doc.get("source", {}))),
            files=files,
            tree=tree,
        )

    # step 9
    def _top_level(self) -> dict[str, Any]:
        path, doc = self.path, self.doc
        if not isinstance(doc, dict):
            raise _type_error("index body", "a JSON object", doc, path)
        for key in ("format", "version", "alignment", "checksum", "partitions", "tensors"):
            if key not in doc:
                raise CorruptIndexError(f"index body lacks the required field {key!r}", path=path)
        kinds: dict[str, tuple[type, str]] = {
            "partitions": (list, "a list"),
            "tensors": (list, "a list"),
            "checksum": (dict, "an object"),
            "aliases": (dict, "an object"),
            "source": (dict, "an object"),
            "metadata": (dict, "an object"),
            "files": (list, "a list"),
            "tree": (list, "a list"),
        }
        for key, (kind, text) in kinds.items():
            if key in doc and not isinstance(doc[key], kind):
                raise _type_error(f"field {key!r}", text, doc[key], path)
        if doc["format"] != "fastckpt":
            raise CorruptIndexError(
                f"field 'format' = {spec.show(doc['format'])}; it must be 'fastckpt'", path=path
            )
        version = doc["version"]
        want = [self.header.major, self.header.minor]
        valid = isinstance(version, list) and all(type(v) is int for v in version)
        if not valid or version != want:
            raise CorruptIndexError(
                f"field 'version' = {spec.show(version)}; it must equal the header's {want}",
                path=path,
            )
        alignment = spec.check_uint(doc["alignment"], "field 'alignment'", path=path)
        if alignment < spec.MIN_ALIGNMENT or alignment & (alignment - 1):
            raise CorruptIndexError(
                f"field 'alignment' = {alignment}; it must be a power of two >= "
                f"{spec.MIN_ALIGNMENT}",
                path=path,
            )
        self.alignment = alignment
        checksum = doc["checksum"]
        algorithm = checksum.get("algorithm")
        if algorithm != spec.CHECKSUM_ALGORITHM:
            raise CorruptIndexError(
                f"checksum algorithm {spec.show(algorithm)} is not "
                f"{spec.CHECKSUM_ALGORITHM!r}, the only one of version {spec.MAJOR}.x",
                path=path,
            )
        chunk = spec.check_uint(checksum.get("chunk_bytes"), "checksum chunk_bytes", path=path)
        if chunk == 0 or chunk % spec.PAGE:
            raise CorruptIndexError(
                f"checksum chunk_bytes = {chunk}; it must be a positive multiple of {spec.PAGE}",
                path=path,
            )
        self.chunk_bytes = chunk
        for key, value in doc.get("metadata", {}).items():
            if not isinstance(value, str):
                raise _type_error(f"metadata[{spec.show(key)}]", "a string", value, path)
        return doc

    # steps 10-13
    def _partitions(self, entries: list[Any]) -> list[PartitionEntry]:
        path = self.path
        seen: set[str] = set()
        out: list[PartitionEntry] = []
        for i, entry in enumerate(entries):
            what = f"partitions[{i}]"
            if not isinstance(entry, dict):
                raise _type_error(what, "an object", entry, path)
            for key in ("file", "nbytes", "checksums"):
                if key not in entry:
                    raise CorruptIndexError(f"{what} lacks the field {key!r}", path=path)
            name = entry["file"]
            spec.check_file_name(name, path=path)
            if name == spec.INDEX_FILE or name in seen:
                raise CorruptIndexError(
                    f"{what}.file = {name!r} is the index or another partition's file; "
                    "partition files must be distinct",
                    path=path,
                )
            seen.add(name)
            nbytes = spec.check_uint(entry["nbytes"], f"{what}.nbytes", path=path)
            if nbytes % spec.PAGE:
                raise CorruptIndexError(
                    f"{what}.nbytes = {nbytes}; it must be a multiple of {spec.PAGE}", path=path
                )
            device = entry.get("device")
            if device is not None and not (isinstance(device, str) and device):
                raise _type_error(f"{what}.device", "a non-empty string or null", device, path)
            checksums = entry["checksums"]
            if not isinstance(checksums, list):
                raise _type_error(f"{what}.checksums", "a list", checksums, path)
            file_path = os.path.join(self.root, name)
            self._check_file(name, file_path, nbytes, what)
            count = -(-nbytes // self.chunk_bytes)
            if len(checksums) != count:
                raise CorruptIndexError(
                    f"{what} has {len(checksums)} checksums; {nbytes} bytes in chunks of "
                    f"{self.chunk_bytes} need {count}",
                    path=path,
                )
            for k, value in enumerate(checksums):
                if type(value) is not int or not 0 <= value < 1 << 32:
                    raise _type_error(
                        f"{what}.checksums[{k}]", "an integer in [0, 2^32)", value, path
                    )
            out.append(
                PartitionEntry(
                    file=name,
                    path=file_path,
                    nbytes=nbytes,
                    data_start=0,
                    data_end=nbytes,
                    device=device,
                    checksums=tuple(checksums),
                )
            )
        return out

    def _check_file(self, name: str, file_path: str, nbytes: int, what: str) -> None:
        try:
            f = self.dir.open(name, error=MissingPartitionError, what=f"{what}: partition")
        except FileNotFoundError:
            raise MissingPartitionError(
                f"{what}: partition file is missing (the checkpoint is incomplete)",
                path=file_path,
            ) from None
        self.opened.partitions.append(f)
        if f.size < nbytes:
            raise TruncatedError(
                f"{what}: partition file is {f.size} bytes; the index says {nbytes}",
                path=file_path,
                offset=f.size,
            )
        if f.size > nbytes:
            raise CorruptIndexError(
                f"{what}: partition file is {f.size} bytes; the index says {nbytes} (the file "
                "was modified, or the index belongs to another checkpoint)",
                path=file_path,
                offset=nbytes,
            )

    # steps 14-20
    def _tensors(
        self, entries: list[Any], partitions: list[PartitionEntry]
    ) -> dict[str, TensorEntry]:
        path = self.path
        found: dict[str, tuple[int, TensorEntry]] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _type_error(f"tensors[{i}]", "an object", entry, path)
            if not entry.keys() >= _TENSOR_KEYS:
                missing = sorted(_TENSOR_KEYS - entry.keys())
                raise CorruptIndexError(f"tensors[{i}] lacks the field(s) {missing}", path=path)
            name = spec.check_tensor_name(entry["name"], path=path, what=f"tensors[{i}].name")
            if name in found:
                raise CorruptIndexError(
                    f"tensors[{i}]: tensor name {name!r} appears twice", path=path, tensor=name
                )
            dtype = entry["dtype"]
            item = dtypes.get(dtype, path=path, tensor=name)
            shape = spec.check_shape(entry["shape"], path=path, tensor=name)
            expected = spec.shape_nbytes(item.itemsize, shape, path=path, tensor=name)
            nbytes = spec.check_uint(entry["nbytes"], "nbytes", path=path, tensor=name)
            if nbytes != expected:
                raise DtypeError(
                    f"nbytes = {nbytes}, but {dtype} ({item.itemsize} bytes) x shape "
                    f"{list(shape)} = {expected}",
                    path=path,
                    tensor=name,
                )
            part = spec.check_uint(entry["partition"], "partition", path=path, tensor=name)
            if part >= len(partitions):
                raise CorruptIndexError(
                    f"partition = {part}, but the index has {len(partitions)} partitions",
                    path=path,
                    tensor=name,
                )
            offset = spec.check_uint(entry["offset"], "offset", path=path, tensor=name)
            if offset % self.alignment:
                raise CorruptIndexError(
                    f"offset {offset} is not a multiple of the alignment {self.alignment}",
                    path=partitions[part].path,
                    tensor=name,
                    offset=offset,
                )
            limit = partitions[part].nbytes
            if offset + nbytes > limit:
                raise OutOfBoundsError(
                    f"bytes [{offset}, {offset + nbytes}) lie outside the partition's "
                    f"{limit} bytes",
                    path=partitions[part].path,
                    tensor=name,
                    offset=offset,
                )
            found[name] = (i, TensorEntry(name, part, offset, nbytes, dtype, shape))
        ordered = sorted(found.values(), key=lambda it: (it[1].partition, it[1].offset, it[0]))
        tensors = {t.name: t for _, t in ordered}
        spec.check_no_overlap(
            [spec.Span(t.partition, t.offset, t.end, t.name) for t in tensors.values()],
            paths=[p.path for p in partitions],
        )
        return tensors

    # step 21
    def _aliases(self, aliases: dict[str, Any], tensors: dict[str, TensorEntry]) -> dict[str, str]:
        path = self.path
        for alias, target in aliases.items():
            spec.check_tensor_name(alias, path=path, what="alias name")
            if alias in tensors:
                raise CorruptIndexError(
                    f"alias {alias!r} is also the name of a stored tensor", path=path, tensor=alias
                )
            if not isinstance(target, str):
                raise _type_error(f"aliases[{alias!r}]", "a tensor name", target, path, alias)
            if target not in tensors:
                why = "another alias (chains are not allowed)" if target in aliases else "missing"
                raise CorruptIndexError(
                    f"alias {alias!r} points to {target!r}, which is {why}; an alias must name "
                    "a stored tensor",
                    path=path,
                    tensor=alias,
                )
        return dict(aliases)

    def _tree(self, entries: list[Any], files: tuple[str, ...]) -> tuple[str, ...]:
        return _check_tree(self, entries, files)

    # step 22
    def _files(self, names: list[Any], partitions: list[PartitionEntry]) -> tuple[str, ...]:
        path = self.path
        taken = {spec.INDEX_FILE, *(p.file for p in partitions)}
        out: list[str] = []
        for name in names:
            spec.check_file_name(name, path=path)
            if name in taken:
                raise CorruptIndexError(
                    f"carried file {name!r} is listed twice, or is the index or a partition",
                    path=path,
                )
            taken.add(name)
            self._open_carried(name)
            out.append(name)
        return tuple(out)

    def _open_carried(self, rel: str) -> None:
        """Open a carried file (top-level or in the tree) beneath the checkpoint directory and
        keep it with the index's open files."""
        try:
            f = self.dir.open(rel, error=MissingPartitionError, what="carried file")
        except FileNotFoundError:
            raise MissingPartitionError(
                "carried file listed in the index is missing (the checkpoint is incomplete)",
                path=os.path.join(self.root, rel),
            ) from None
        self.opened.carried[rel] = f


# step 23 (format 1.1): carried files in sub-folders
def _check_tree(
    builder: _IndexBuilder, entries: list[Any], files: tuple[str, ...]
) -> tuple[str, ...]:
    path = builder.path
    taken = set(files)
    out: list[str] = []
    for rel in entries:
        spec.check_tree_path(rel, path=path)
        if rel in taken or rel.split("/", 1)[0] in taken:
            raise CorruptIndexError(
                f"tree entry {rel!r} is listed twice, or its folder is a carried file", path=path
            )
        taken.add(rel)
        builder._open_carried(rel)
        out.append(rel)
    return tuple(out)


__all__ = ["read_fastckpt"]
