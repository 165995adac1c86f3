"""Constants and byte-level helpers of the fastckpt format (FORMAT.md). Imports no torch.

Everything a writer and a reader must agree on lives here: the index file name, the 32-byte
header layout, the limits, the partition file naming and the file-name safety rule. CRC32C comes
from ``fastckpt._core`` when the extension is importable, else from a small table implementation
(fine for the index body, far too slow for partition data).
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from fastckpt.errors import (
    CorruptDataError,
    CorruptIndexError,
    InvalidNameError,
    LimitError,
    OverlapError,
    TruncatedError,
    UnsafePathError,
)

INDEX_FILE = "fastckpt.index"
"""Name of the index file inside a checkpoint directory."""

MAGIC = b"FCKPTIDX"
MAJOR = 1
MINOR = 0
HEADER_NBYTES = 32
HEADER_STRUCT = struct.Struct("<8sHHIQII")
"""magic, major, minor, flags, body_nbytes, body_crc32c, reserved."""

MAX_BODY_NBYTES = 1 << 30
"""Largest JSON body a reader accepts (1 GiB)."""

PAGE = 4096
"""Partition file sizes and checksum chunk sizes are multiples of this."""

MIN_ALIGNMENT = 256
"""Smallest tensor offset alignment a fastckpt partition may declare."""

CHECKSUM_ALGORITHM = "crc32c"

MAX_NAME_NBYTES = 255
"""Longest file name (UTF-8 bytes) allowed for partitions and carried files."""

MAX_NDIM = 64
"""Most dimensions a tensor of a fastckpt checkpoint may have (stock safetensors: no limit)."""

MAX_SAFETENSORS_HEADER_NBYTES = 100_000_000
"""Largest safetensors JSON header accepted (the limit the safetensors library itself uses)."""

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"

INT_LIMIT = 1 << 63
"""Every integer field of an index is in ``[0, INT_LIMIT)``; tensor byte sizes are below it."""

assert HEADER_STRUCT.size == HEADER_NBYTES


class Header(NamedTuple):
    """The decoded fixed-size header of an index file (not yet validated)."""

    magic: bytes
    major: int
    minor: int
    flags: int
    body_nbytes: int
    body_crc32c: int
    reserved: int


def partition_name(i: int) -> str:
    """File name of partition ``i``: ``part-00000.fckpt``."""
    if i < 0:
        raise ValueError(f"partition number must be >= 0, got {i}")
    return f"part-{i:05d}.fckpt"


def check_file_name(name: object, *, path: str | None) -> None:
    """Refuse a file name that is not a plain name inside the checkpoint directory.

    ``path`` is the file reported in the error (usually the index). Raises ``UnsafePathError``.
    """
    if not isinstance(name, str):
        raise UnsafePathError(
            f"file name must be a string, got {type(name).__name__} {name!r}", path=path
        )
    problem: str | None = None
    if name == "":
        problem = "is empty"
    elif name in (".", ".."):
        problem = "names a directory"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif "\x00" in name:
        problem = "contains a NUL character"
    else:
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
        else:
            if len(encoded) > MAX_NAME_NBYTES:
                problem = f"is {len(encoded)} bytes long (limit {MAX_NAME_NBYTES})"
    if problem is not None:
        raise UnsafePathError(
            f"file name {name!r} {problem}; checkpoint files must be plain names inside the "
            "checkpoint directory (no '/', '\\', '..', NUL)",
            path=path,
        )


MAX_TREE_DEPTH = 8
"""Most folders a carried tree path may go down (``a/b/c.json`` is 2)."""


def check_tree_path(rel: object, *, path: str | None) -> str:
    """A carried tree path (FORMAT.md 2.1, ``tree``): ``/``-separated components, each a safe
    file name not starting with ``.``, at least one folder, at most ``MAX_TREE_DEPTH``."""
    if not isinstance(rel, str):
        raise UnsafePathError(
            f"tree entry must be a string, got {type(rel).__name__} {show(rel)}", path=path
        )
    parts = rel.split("/")
    if len(parts) < 2 or len(parts) - 1 > MAX_TREE_DEPTH:
        raise UnsafePathError(
            f"tree entry {show(rel)} must name a file 1 to {MAX_TREE_DEPTH} folders deep",
            path=path,
        )
    for part in parts:
        check_file_name(part, path=path)
        if part.startswith("."):
            raise UnsafePathError(
                f"tree entry {show(rel)} has a hidden component {part!r}", path=path
            )
    return rel


# --- CRC32C -------------------------------------------------------------------------------------


def _make_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE: tuple[int, ...] | None = None


def crc32c_py(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Pure-Python CRC32C (slow: for small buffers when ``fastckpt._core`` is unavailable)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _make_table()
    table = _TABLE
    crc = value ^ 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _resolve_crc32c() -> Callable[..., int]:
    try:
        core = importlib.import_module("fastckpt._core")
    except ImportError:
        return crc32c_py
    impl: Callable[..., int] = core.crc32c
    return impl


_crc_impl: Callable[..., int] | None = None


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``value`` (the C++ core when built, else Python)."""
    global _crc_impl
    if _crc_impl is None:
        _crc_impl = _resolve_crc32c()
    return int(_crc_impl(data, value))


# --- header -------------------------------------------------------------------------------------


def pack_header(body: bytes, *, major: int = MAJOR, minor: int = MINOR, flags: int = 0) -> bytes:
    """The 32-byte header for an index whose JSON body is ``body``.

    ``major``/``minor``/``flags`` default to this version's values; other values exist for tests.
    """
    if len(body) > MAX_BODY_NBYTES:
        raise ValueError(f"index body is {len(body)} bytes; the limit is {MAX_BODY_NBYTES}")
    return HEADER_STRUCT.pack(MAGIC, major, minor, flags, len(body), crc32c(body), 0)


def unpack_header(data: bytes) -> Header:
    """Decode the first ``HEADER_NBYTES`` of ``data`` (the caller checks the length first)."""
    return Header(*HEADER_STRUCT.unpack_from(data, 0))


# --- validation rules shared by the fastckpt and safetensors readers ------------------------------


def show(value: object, limit: int = 60) -> str:
    """A short ``repr`` for error messages (hostile input can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_uint(
    value: object,
    field: str,
    *,
    path: str | None,
    tensor: str | None = None,
    limit: int = INT_LIMIT,
) -> int:
    """``value`` as an int in ``[0, limit)``.

    Not an integer (bools and floats included) or negative: ``CorruptIndexError``; at or above
    ``limit``: ``LimitError``.
    """
    if type(value) is not int:
        raise CorruptIndexError(
            f"{field} must be an integer, got {type(value).__name__} {show(value)}",
            path=path,
            tensor=tensor,
        )
    if value < 0:
        raise CorruptIndexError(
            f"{field} = {show(value)} is negative; it must be >= 0", path=path, tensor=tensor
        )
    if value >= limit:
        raise LimitError(
            f"{field} = {show(value)} is too large; the limit is {limit - 1}",
            path=path,
            tensor=tensor,
        )
    return value


def check_shape(
    value: object, *, path: str | None, tensor: str | None, limit_ndim: bool = True
) -> tuple[int, ...]:
    """A tensor shape: a list of at most ``MAX_NDIM`` integers in ``[0, 2^63)``.

    ``limit_ndim=False`` (stock safetensors, which sets no such limit) skips the ``MAX_NDIM``
    check; the header size limit bounds the list anyway.
    """
    if not isinstance(value, list):
        raise CorruptIndexError(
            f"shape must be a list of integers, got {type(value).__name__} {show(value)}",
            path=path,
            tensor=tensor,
        )
    if limit_ndim and len(value) > MAX_NDIM:
        raise LimitError(
            f"shape has {len(value)} dimensions; the limit is {MAX_NDIM}", path=path, tensor=tensor
        )
    if all(type(d) is int and 0 <= d < INT_LIMIT for d in value):  # the common case, fast
        return tuple(value)
    return tuple(
        check_uint(d, f"shape[{i}]", path=path, tensor=tensor) for i, d in enumerate(value)
    )


def shape_nbytes(
    itemsize: int, shape: Sequence[int], *, path: str | None, tensor: str | None
) -> int:
    """``itemsize * prod(shape)``, refusing (``LimitError``) any result of 2^63 bytes or more.

    Empty dimensions count as 1 in that limit too: a tensor's strides are products of its later
    dimensions, so a shape like ``[0, 2**62, 2**62]`` holds no byte yet cannot be created by
    torch (its strides overflow). The product is built with an early exit, so absurd shapes cost
    nothing.
    """
    total = itemsize
    for dim in shape:
        total *= dim if dim > 1 else 1
        if total >= INT_LIMIT:
            raise LimitError(
                f"shape {show(list(shape))} spans 2^63 bytes or more (empty dimensions counted "
                "as 1, as in its strides); the limit is 2^63 - 1",
                path=path,
                tensor=tensor,
            )
    return 0 if 0 in shape else total


def check_tensor_name(name: object, *, path: str | None, what: str = "tensor name") -> str:
    """The one name rule for tensors and aliases (FORMAT.md 2.1): a non-empty string that is
    valid UTF-8 (no lone surrogates). Raises ``InvalidNameError``."""
    if not isinstance(name, str):
        raise InvalidNameError(
            f"{what} must be a string, got {type(name).__name__} {show(name)}", path=path
        )
    if not name:
        raise InvalidNameError(f"{what} is empty; the format requires non-empty names", path=path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNameError(
            f"{what} {show(name)} is not valid UTF-8 (a lone surrogate)", path=path, tensor=None
        ) from None
    return name


_BOOL_OK = bytes((0, 1))


def check_bool_bytes(
    data: bytes | bytearray | memoryview, *, path: str | None, tensor: str | None
) -> None:
    """Refuse (``CorruptDataError``) ``bool`` tensor bytes other than 0 and 1 (FORMAT.md 3)."""
    bad = bytes(data).translate(None, _BOOL_OK)
    if bad:
        raise CorruptDataError(
            f"bool tensor holds the byte {bad[0]}; bool elements must be 0 or 1",
            path=path,
            tensor=tensor,
        )


class Span(NamedTuple):
    """A tensor's byte range in a partition, for the overlap check."""

    partition: int
    offset: int
    end: int
    name: str


def check_no_overlap(spans: Sequence[Span], *, paths: Mapping[int, str] | Sequence[str]) -> None:
    """Refuse (``OverlapError``) two non-empty spans of one partition that share a byte."""
    ordered = sorted((s for s in spans if s.end > s.offset), key=lambda s: (s.partition, s.offset))
    for prev, cur in itertools.pairwise(ordered):
        if prev.partition == cur.partition and cur.offset < prev.end:
            raise OverlapError(
                f"tensor bytes [{cur.offset}, {cur.end}) overlap tensor {prev.name!r} at "
                f"[{prev.offset}, {prev.end})",
                path=paths[cur.partition],
                tensor=cur.name,
                offset=cur.offset,
            )


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def loads_json(data: bytes, *, path: str | None, what: str) -> Any:
    """Strict JSON (FORMAT.md 2.1): UTF-8, no repeated keys, no NaN/Infinity.

    Every failure, however deep or odd the input, is a ``CorruptIndexError``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptIndexError(
            f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise CorruptIndexError(
            f"{what} repeats the key {show(exc.key)} in one JSON object", path=path
        ) from None
    except RecursionError:
        raise CorruptIndexError(f"{what} nests JSON too deeply", path=path) from None
    except ValueError as exc:  # JSONDecodeError, huge integer literals, NaN/Infinity
        raise CorruptIndexError(f"{what} is not valid JSON: {exc}", path=path) from None


# --- file access ---------------------------------------------------------------------------------


def pread_exact(fd: int, nbytes: int, offset: int, *, path: str, what: str) -> bytes:
    """Exactly ``nbytes`` at ``offset``; a short file raises ``TruncatedError``."""
    parts: list[bytes] = []
    got = 0
    while got < nbytes:
        chunk = os.pread(fd, min(nbytes - got, 64 << 20), offset + got)
        if not chunk:
            raise TruncatedError(
                f"{what}: file ended after {offset + got} bytes, expected {offset + nbytes}",
                path=path,
                offset=offset + got,
            )
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


__all__ = [
    "CHECKSUM_ALGORITHM",
    "HEADER_NBYTES",
    "HEADER_STRUCT",
    "INDEX_FILE",
    "INT_LIMIT",
    "MAGIC",
    "MAJOR",
    "MAX_BODY_NBYTES",
    "MAX_NAME_NBYTES",
    "MAX_NDIM",
    "MAX_SAFETENSORS_HEADER_NBYTES",
    "MAX_TREE_DEPTH",
    "MINOR",
    "MIN_ALIGNMENT",
    "PAGE",
    "SAFETENSORS_INDEX_SUFFIX",
    "Header",
    "Span",
    "check_bool_bytes",
    "check_file_name",
    "check_no_overlap",
    "check_shape",
    "check_tensor_name",
    "check_tree_path",
    "check_uint",
    "crc32c",
    "crc32c_py",
    "loads_json",
    "pack_header",
    "partition_name",
    "pread_exact",
    "shape_nbytes",
    "show",
    "unpack_header",
]
