"""A named corpus of malformed fastckpt checkpoints: each must raise its exact FormatError subclass.

Every case starts from a small valid checkpoint built by hand (``golden_gen``), breaks one thing,
and checks the error class and where it points (file, tensor, offset).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from golden_gen import Draft, draft, encode_body, make, write

from fastckpt.errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    DtypeError,
    FormatError,
    InvalidNameError,
    LimitError,
    MissingPartitionError,
    OutOfBoundsError,
    OverlapError,
    TruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
)
from fastckpt.format import spec
from fastckpt.format.reader import read_index


def base() -> Draft:
    """Two partitions, an alias, a carried file: the valid starting point of every case."""
    return draft(
        [
            make("w", "float32", (4, 8)),
            make("b", "bfloat16", (16,)),
            make("e", "float16", (0,)),
            make("x", "int64", (3,), partition=1),
        ],
        aliases={"tied": "w"},
        metadata={"format": "pt"},
        files={"config.json": b"{}"},
    )


def written(tmp: Path, edit: Callable[[Draft], None] | None = None, **kw: Any) -> Path:
    d = base()
    if edit is not None:
        edit(d)
    write(d, tmp, **kw)
    return tmp


def patch_index(tmp: Path, offset: int, data: bytes) -> None:
    p = tmp / spec.INDEX_FILE
    raw = bytearray(p.read_bytes())
    raw[offset : offset + len(data)] = data
    p.write_bytes(bytes(raw))


def rewrite_body(tmp: Path, body: bytes, **kw: Any) -> None:
    (tmp / spec.INDEX_FILE).write_bytes(spec.pack_header(body, **kw) + body)


def t(d: Draft, i: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = d.body["tensors"][i]
    return entry


def p(d: Draft, i: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = d.body["partitions"][i]
    return entry


@dataclass
class Case:
    name: str
    build: Callable[[Path], Any]
    error: type[FormatError]
    tensor: str | None = None
    offset: int | None = None
    path_endswith: str | None = None


def _set(path: list[Any], value: Any) -> Callable[[Draft], None]:
    def edit(d: Draft) -> None:
        node: Any = d.body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _delete(path: list[Any]) -> Callable[[Draft], None]:
    def edit(d: Draft) -> None:
        node: Any = d.body
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


def _truncate_partition(tmp: Path) -> None:
    written(tmp)
    part = tmp / spec.partition_name(0)
    part.write_bytes(part.read_bytes()[:100])


def _grow_partition(tmp: Path) -> None:
    written(tmp)
    with open(tmp / spec.partition_name(1), "ab") as f:
        f.write(bytes(4096))


def _truncate_index(n: int) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        written(tmp)
        idx = tmp / spec.INDEX_FILE
        idx.write_bytes(idx.read_bytes()[:n])

    return build


def _index_bytes(data: bytes) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        written(tmp)
        (tmp / spec.INDEX_FILE).write_bytes(data)

    return build


def _patch(offset: int, data: bytes) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        written(tmp)
        patch_index(tmp, offset, data)

    return build


def _body(text: bytes, **kw: Any) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        written(tmp)
        rewrite_body(tmp, text, **kw)

    return build


def _edit(edit: Callable[[Draft], None], **kw: Any) -> Callable[[Path], None]:
    return lambda tmp: written(tmp, edit, **kw)


def _missing_partition(tmp: Path) -> None:
    written(tmp)
    os.unlink(tmp / spec.partition_name(1))


def _partition_is_dir(tmp: Path) -> None:
    written(tmp)
    os.unlink(tmp / spec.partition_name(1))
    os.mkdir(tmp / spec.partition_name(1))


def _missing_file(tmp: Path) -> None:
    written(tmp)
    os.unlink(tmp / "config.json")


def _overlap(d: Draft) -> None:
    t(d, 1)["offset"] = 0  # b onto w


def _unordered_overlap(d: Draft) -> None:
    # Listed out of order and overlapping: the reader orders entries itself before checking.
    d.body["tensors"].reverse()
    next(e for e in d.body["tensors"] if e["name"] == "b")["offset"] = 0


def _dup_name(d: Draft) -> None:
    t(d, 1)["name"] = "w"


def _dup_partition(d: Draft) -> None:
    p(d, 1)["file"] = p(d, 0)["file"]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _header(major: int = 1, minor: int = 0, flags: int = 0, body_nbytes: int = 2) -> bytes:
    return struct.pack("<8sHHIQII", spec.MAGIC, major, minor, flags, body_nbytes, 0, 0)


CASES = [
    # --- partitions on disk
    Case("truncated partition", _truncate_partition, TruncatedError, path_endswith="00000.fckpt"),
    Case("partition larger than index says", _grow_partition, CorruptIndexError),
    Case("missing partition", _missing_partition, MissingPartitionError, path_endswith="01.fckpt"),
    Case("partition is a directory", _partition_is_dir, MissingPartitionError),
    # --- index file, header
    Case("empty index", _index_bytes(b""), TruncatedError),
    Case("index shorter than header", _truncate_index(20), TruncatedError),
    Case("index truncated in body", _truncate_index(60), TruncatedError),
    Case("index missing last byte", _truncate_index(-1), TruncatedError),
    Case("garbage index", _index_bytes(os.urandom(200)), BadMagicError),
    Case("short garbage index", _index_bytes(b"PK\x03"), BadMagicError),
    Case("wrong magic", _patch(0, b"FCKPTIDY"), BadMagicError, offset=0),
    Case(
        "safetensors file named fastckpt.index",
        _index_bytes(b"\x02\0\0\0\0\0\0\0{}"),
        BadMagicError,
    ),
    Case("major version 2", _patch(8, struct.pack("<H", 2)), UnsupportedVersionError),
    Case("major version 0", _patch(8, struct.pack("<H", 0)), UnsupportedVersionError),
    Case(
        "unknown major with garbage body",
        _index_bytes(_header(major=7) + b"??"),
        UnsupportedVersionError,
    ),
    Case("flags set", _patch(12, struct.pack("<I", 1)), CorruptIndexError, offset=12),
    Case("reserved set", _patch(28, struct.pack("<I", 5)), CorruptIndexError, offset=28),
    Case("absurd body length", _index_bytes(_header(body_nbytes=1 << 62) + b"{}"), LimitError),
    Case(
        "body length just over limit", _index_bytes(_header(body_nbytes=(1 << 30) + 1)), LimitError
    ),
    Case(
        "body length past end of file",
        _index_bytes(_header(body_nbytes=1000) + b"{}"),
        TruncatedError,
    ),
    Case(
        "trailing bytes after body", _index_bytes(_header(body_nbytes=0) + b"{}"), CorruptIndexError
    ),
    Case("body CRC mismatch", _patch(40, b"#"), ChecksumError, offset=32),
    Case("header CRC field wrong", _patch(24, b"\0\0\0\0"), ChecksumError),
    # --- JSON
    Case("body not JSON", _body(b"{not json"), CorruptIndexError),
    Case("body not UTF-8", _body(b'{"format": "\xff"}'), CorruptIndexError),
    Case("body with BOM", _body(b"\xef\xbb\xbf{}"), CorruptIndexError),
    Case("body is a list", _body(b"[]"), CorruptIndexError),
    Case("body empty", _body(b""), CorruptIndexError),
    Case("body nests too deep", _body(_nested(100_000)), CorruptIndexError),
    Case("NaN in body", _body(b'{"format": NaN}'), CorruptIndexError),
    Case(
        "duplicate JSON key",
        _body(b'{"format": "fastckpt", "format": "fastckpt"}'),
        CorruptIndexError,
    ),
    Case("huge integer literal", _body(b'{"alignment": ' + b"9" * 5000 + b"}"), CorruptIndexError),
    # --- top-level fields
    Case("missing tensors field", _edit(_delete(["tensors"])), CorruptIndexError),
    Case("wrong format name", _edit(_set(["format"], "safetensors")), CorruptIndexError),
    Case("version differs from header", _edit(_set(["version"], [1, 1])), CorruptIndexError),
    Case("version with bools", _edit(_set(["version"], [True, False])), CorruptIndexError),
    Case("alignment not a power of two", _edit(_set(["alignment"], 384)), CorruptIndexError),
    Case("alignment below 256", _edit(_set(["alignment"], 128)), CorruptIndexError),
    Case("alignment is a float", _edit(_set(["alignment"], 256.0)), CorruptIndexError),
    Case(
        "unknown checksum algorithm",
        _edit(_set(["checksum", "algorithm"], "xxh3")),
        CorruptIndexError,
    ),
    Case(
        "chunk_bytes not page multiple",
        _edit(_set(["checksum", "chunk_bytes"], 5000)),
        CorruptIndexError,
    ),
    Case("chunk_bytes zero", _edit(_set(["checksum", "chunk_bytes"], 0)), CorruptIndexError),
    Case("partitions not a list", _edit(_set(["partitions"], {})), CorruptIndexError),
    Case("metadata value not a string", _edit(_set(["metadata", "n"], 3)), CorruptIndexError),
    Case("source not an object", _edit(_set(["source"], "x")), CorruptIndexError),
    # --- partitions in the index
    Case("path escape ../x", _edit(_set(["partitions", 0, "file"], "../x")), UnsafePathError),
    Case("path with directory a/b", _edit(_set(["partitions", 0, "file"], "a/b")), UnsafePathError),
    Case("absolute path", _edit(_set(["partitions", 0, "file"], "/etc/passwd")), UnsafePathError),
    Case("path is ..", _edit(_set(["partitions", 0, "file"], "..")), UnsafePathError),
    Case("path is .", _edit(_set(["partitions", 0, "file"], ".")), UnsafePathError),
    Case("path with backslash", _edit(_set(["partitions", 0, "file"], "a\\b")), UnsafePathError),
    Case("path with NUL", _edit(_set(["partitions", 0, "file"], "a\x00b")), UnsafePathError),
    Case("empty path", _edit(_set(["partitions", 0, "file"], "")), UnsafePathError),
    Case("path too long", _edit(_set(["partitions", 0, "file"], "x" * 256)), UnsafePathError),
    Case("path not a string", _edit(_set(["partitions", 0, "file"], 7)), UnsafePathError),
    Case(
        "partition named like the index",
        _edit(_set(["partitions", 0, "file"], spec.INDEX_FILE)),
        CorruptIndexError,
    ),
    Case("duplicate partition file", _edit(_dup_partition), CorruptIndexError),
    Case(
        "partition nbytes not page multiple",
        _edit(_set(["partitions", 0, "nbytes"], 4000)),
        CorruptIndexError,
    ),
    Case(
        "partition nbytes negative",
        _edit(_set(["partitions", 0, "nbytes"], -4096)),
        CorruptIndexError,
    ),
    Case("partition nbytes absurd", _edit(_set(["partitions", 0, "nbytes"], 1 << 70)), LimitError),
    Case(
        "partition nbytes beyond file",
        _edit(_set(["partitions", 0, "nbytes"], 1 << 40)),
        TruncatedError,
    ),
    Case("device not a string", _edit(_set(["partitions", 0, "device"], 0)), CorruptIndexError),
    Case("too few checksums", _edit(_set(["partitions", 0, "checksums"], [])), CorruptIndexError),
    Case(
        "too many checksums", _edit(_set(["partitions", 1, "checksums"], [0, 0])), CorruptIndexError
    ),
    Case(
        "checksum out of range",
        _edit(_set(["partitions", 1, "checksums"], [1 << 32])),
        CorruptIndexError,
    ),
    # --- tensors
    Case("unknown dtype", _edit(_set(["tensors", 0, "dtype"], "float128")), DtypeError, tensor="w"),
    Case(
        "dtype not a string", _edit(_set(["tensors", 0, "dtype"], ["f32"])), DtypeError, tensor="w"
    ),
    Case(
        "nbytes != dtype x shape",
        _edit(_set(["tensors", 0, "nbytes"], 100)),
        DtypeError,
        tensor="w",
    ),
    Case(
        "shape disagrees with nbytes",
        _edit(_set(["tensors", 0, "shape"], [4, 9])),
        DtypeError,
        tensor="w",
    ),
    Case(
        "negative shape",
        _edit(_set(["tensors", 0, "shape"], [-4, -8])),
        CorruptIndexError,
        tensor="w",
    ),
    Case(
        "huge shape product",
        _edit(_set(["tensors", 0, "shape"], [1 << 40, 1 << 40])),
        LimitError,
        tensor="w",
    ),
    Case(
        "huge single dimension",
        _edit(_set(["tensors", 0, "shape"], [1 << 63])),
        LimitError,
        tensor="w",
    ),
    Case(
        "too many dimensions",
        _edit(_set(["tensors", 0, "shape"], [1] * 65)),
        LimitError,
        tensor="w",
    ),
    Case(
        "shape not a list", _edit(_set(["tensors", 0, "shape"], 32)), CorruptIndexError, tensor="w"
    ),
    Case(
        "shape with float",
        _edit(_set(["tensors", 0, "shape"], [4.0, 8])),
        CorruptIndexError,
        tensor="w",
    ),
    Case(
        "shape with bool",
        _edit(_set(["tensors", 0, "shape"], [True, 32])),
        CorruptIndexError,
        tensor="w",
    ),
    Case("empty tensor name", _edit(_set(["tensors", 0, "name"], "")), InvalidNameError),
    Case("tensor name not a string", _edit(_set(["tensors", 0, "name"], 7)), InvalidNameError),
    Case("duplicate tensor names", _edit(_dup_name), CorruptIndexError, tensor="w"),
    Case("missing offset", _edit(_delete(["tensors", 0, "offset"])), CorruptIndexError),
    Case(
        "partition out of range",
        _edit(_set(["tensors", 0, "partition"], 2)),
        CorruptIndexError,
        tensor="w",
    ),
    Case(
        "misaligned offset",
        _edit(_set(["tensors", 0, "offset"], 128)),
        CorruptIndexError,
        tensor="w",
        offset=128,
    ),
    Case(
        "offset out of bounds",
        _edit(_set(["tensors", 0, "offset"], 4096)),
        OutOfBoundsError,
        tensor="w",
        offset=4096,
    ),
    Case(
        "offset far out of bounds",
        _edit(_set(["tensors", 0, "offset"], 1 << 62)),
        OutOfBoundsError,
        tensor="w",
    ),
    Case("offset absurd", _edit(_set(["tensors", 0, "offset"], 1 << 63)), LimitError, tensor="w"),
    Case(
        "empty tensor past the end",
        _edit(_set(["tensors", 2, "offset"], 8192)),
        OutOfBoundsError,
        tensor="e",
    ),
    Case("overlapping offsets", _edit(_overlap), OverlapError, tensor="b", offset=0),
    Case("overlap listed out of order", _edit(_unordered_overlap), OverlapError),
    # --- aliases
    Case(
        "alias to missing tensor",
        _edit(_set(["aliases", "tied"], "nope")),
        CorruptIndexError,
        tensor="tied",
    ),
    Case(
        "alias chain", _edit(_set(["aliases", "tied2"], "tied")), CorruptIndexError, tensor="tied2"
    ),
    Case(
        "alias shadows a tensor", _edit(_set(["aliases", "b"], "w")), CorruptIndexError, tensor="b"
    ),
    Case("alias target not a string", _edit(_set(["aliases", "tied"], 1)), CorruptIndexError),
    Case("empty alias name", _edit(_set(["aliases", ""], "w")), InvalidNameError),
    # --- carried files
    Case("carried file missing", _missing_file, MissingPartitionError, path_endswith="config.json"),
    Case("carried file escapes", _edit(_set(["files"], ["../config.json"])), UnsafePathError),
    Case(
        "carried file is a partition",
        _edit(_set(["files"], [spec.partition_name(0)])),
        CorruptIndexError,
    ),
    Case(
        "carried file listed twice",
        _edit(_set(["files"], ["config.json", "config.json"])),
        CorruptIndexError,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed(case: Case, tmp_path: Path) -> None:
    case.build(tmp_path)
    with pytest.raises(case.error) as info:
        read_index(tmp_path)
    err = info.value
    assert type(err) is case.error, f"{type(err).__name__}: {err}"
    assert err.path is not None and str(tmp_path) in err.path
    if case.tensor is not None:
        assert err.tensor == case.tensor
    if case.offset is not None:
        assert err.offset == case.offset
    if case.path_endswith is not None:
        assert err.path.endswith(case.path_endswith)
    assert str(err)  # renders


def test_case_names_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


def test_base_is_valid(tmp_path: Path) -> None:
    """The corpus breaks a valid checkpoint: make sure it is valid to begin with."""
    index = read_index(written(tmp_path))
    assert list(index.tensors) == ["w", "b", "e", "x"]
    assert index.aliases == {"tied": "w"}
    assert index.files == ("config.json",)


def test_body_crc_error_carries_values(tmp_path: Path) -> None:
    written(tmp_path)
    patch_index(tmp_path, 40, b"#")
    with pytest.raises(ChecksumError) as info:
        read_index(tmp_path)
    body = (tmp_path / spec.INDEX_FILE).read_bytes()[32:]
    assert info.value.actual == spec.crc32c_py(body)
    assert info.value.expected != info.value.actual


def test_version_error_names_the_fix(tmp_path: Path) -> None:
    written(tmp_path)
    patch_index(tmp_path, 8, struct.pack("<HH", 3, 1))
    with pytest.raises(UnsupportedVersionError, match=r"3\.1.*upgrade fastckpt"):
        read_index(tmp_path)


def test_unsafe_path_message_names_value_and_rule(tmp_path: Path) -> None:
    written(tmp_path, _set(["partitions", 0, "file"], "../secret"))
    with pytest.raises(UnsafePathError, match=r"\.\./secret.*path separator"):
        read_index(tmp_path)


def test_fifo_index_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / spec.INDEX_FILE)
    with pytest.raises(CorruptIndexError, match="not a regular file"):
        read_index(tmp_path)


def test_fifo_partition_does_not_hang(tmp_path: Path) -> None:
    written(tmp_path)
    os.unlink(tmp_path / spec.partition_name(0))
    os.mkfifo(tmp_path / spec.partition_name(0))
    with pytest.raises(MissingPartitionError):
        read_index(tmp_path)


def test_validation_order_first_failure_wins(tmp_path: Path) -> None:
    """Two faults: the one earlier in FORMAT.md section 6 is reported."""

    def two_faults(d: Draft) -> None:
        t(d, 0)["dtype"] = "nope"  # step 15
        p(d, 1)["file"] = "../x"  # step 10: partitions come first

    written(tmp_path, two_faults)
    with pytest.raises(UnsafePathError):
        read_index(tmp_path)


def test_errors_pickle(tmp_path: Path) -> None:
    import pickle

    written(tmp_path, _set(["tensors", 0, "offset"], 4096))
    with pytest.raises(OutOfBoundsError) as info:
        read_index(tmp_path)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is OutOfBoundsError
    assert (again.path, again.tensor, again.offset) == (
        info.value.path,
        info.value.tensor,
        info.value.offset,
    )


def test_raw_body_helper_roundtrip(tmp_path: Path) -> None:
    """``write(raw_body=...)`` with the draft's own bytes gives a valid checkpoint."""
    d = base()
    write(d, tmp_path)
    body = (tmp_path / spec.INDEX_FILE).read_bytes()[32:]
    write(d, tmp_path, raw_body=body)
    assert read_index(tmp_path).nbytes == 4 * 32 + 2 * 16 + 8 * 3
    assert encode_body({"a": 1}) == b'{"a":1}'
