"""verify(): every chunk checksum, the first bad chunk named; chunk bounds."""

from __future__ import annotations

import importlib
import os
import struct
from pathlib import Path

import pytest
from golden_gen import GOLDEN, draft, make, write

import fastckpt
from fastckpt.errors import ChecksumError, TruncatedError
from fastckpt.format import chunk_bounds, read_index, spec, verify
from fastckpt.format.verify import VerifyReport

CHUNK = 4096


def build(tmp: Path) -> Path:
    """Partition 0: 10 chunks (one 40000-byte tensor); partition 1: 2 chunks."""
    d = draft(
        [
            make("big", "uint8", (40000,), 0),
            make("small", "float32", (3,), 0),
            make("other", "int16", (3000,), 1),
        ],
        chunk_bytes=CHUNK,
    )
    write(d, tmp)
    return tmp


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("threads", [1, 4])
def test_clean_checkpoint(tmp_path: Path, threads: int) -> None:
    build(tmp_path)
    report = verify(tmp_path, threads=threads)
    assert isinstance(report, VerifyReport)
    assert report.checksums
    assert report.partitions == 2
    assert report.chunks == 10 + 2
    assert report.nbytes == 40960 + 8192
    assert report.seconds >= 0
    assert "OK" in str(report)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    ("partition", "offset", "tensor"),
    [
        (0, 0, "big"),
        (0, 5 * CHUNK + 17, "big"),
        (0, 40192, "big"),  # in "small", but the chunk's first tensor is named
        (0, 40960 - 1, "big"),  # padding at the end is covered too
        (1, 4096 + 10, "other"),
    ],
)
def test_flipped_byte_names_the_chunk(
    tmp_path: Path, threads: int, partition: int, offset: int, tensor: str | None
) -> None:
    build(tmp_path)
    index = read_index(tmp_path)
    part = index.partitions[partition]
    flip(Path(part.path), offset)
    with pytest.raises(ChecksumError) as exc:
        verify(tmp_path, threads=threads)
    err = exc.value
    chunk = offset // CHUNK
    assert err.partition == partition
    assert err.offset == chunk * CHUNK
    assert err.path == part.path
    assert part.checksums is not None
    assert err.expected == part.checksums[chunk]
    with open(part.path, "rb") as f:
        f.seek(chunk * CHUNK)
        assert err.actual == spec.crc32c(f.read(CHUNK))
    assert err.tensor == tensor
    assert f"chunk {chunk}" in str(err) and part.file in str(err)


def test_chunk_without_tensor(tmp_path: Path) -> None:
    d = draft([make("a", "uint8", (10,)), make("b", "uint8", (10,))], alignment=8192)
    write(d, tmp_path)  # a at 0, b at 8192: chunk 1 is a gap
    flip(tmp_path / spec.partition_name(0), 5000)
    with pytest.raises(ChecksumError) as exc:
        verify(tmp_path)
    assert exc.value.tensor is None and exc.value.offset == 4096


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_first_bad_chunk_wins(tmp_path: Path, threads: int) -> None:
    build(tmp_path)
    index = read_index(tmp_path)
    flip(Path(index.partitions[1].path), 0)  # later in (partition, chunk) order
    flip(Path(index.partitions[0].path), 7 * CHUNK)
    flip(Path(index.partitions[0].path), 3 * CHUNK + 1)
    for _ in range(3):  # thread timing varies; the answer must not
        with pytest.raises(ChecksumError) as exc:
            verify(tmp_path, threads=threads)
        assert (exc.value.partition, exc.value.offset) == (0, 3 * CHUNK)


def test_big_chunks_hashed_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify_mod = importlib.import_module("fastckpt.format.verify")

    monkeypatch.setattr(verify_mod, "READ_PIECE_BYTES", 4096)
    write(draft([make("a", "uint8", (30000,))], chunk_bytes=16384), tmp_path)
    assert verify(tmp_path, threads=2).chunks == 2
    flip(tmp_path / spec.partition_name(0), 20000)
    with pytest.raises(ChecksumError) as exc:
        verify(tmp_path, threads=2)
    assert exc.value.offset == 16384


def test_partition_shrunk_after_validation(tmp_path: Path) -> None:
    """A file that shrinks between validation and the read is reported, not misread."""
    from fastckpt.format.reader import open_checkpoint
    from fastckpt.format.verify import verify_open

    build(tmp_path)
    with open_checkpoint(tmp_path) as ck:
        os.truncate(ck.index.partitions[0].path, 4096)
        with pytest.raises(TruncatedError):
            verify_open(ck, threads=2)


def test_truncated_partition_is_structural(tmp_path: Path) -> None:
    build(tmp_path)
    os.truncate(tmp_path / spec.partition_name(1), 4096)
    with pytest.raises(TruncatedError):
        verify(tmp_path)


def test_bad_threads(tmp_path: Path) -> None:
    build(tmp_path)
    with pytest.raises(ValueError):
        verify(tmp_path, threads=0)


def test_public_name_and_golden() -> None:
    report = fastckpt.verify(GOLDEN / "v1.0-devices")
    assert report.chunks == 1 + 2 + 4 and report.partitions == 3


def test_safetensors_has_no_checksums(tmp_path: Path) -> None:
    import json

    header = json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\1\2")
    report = verify(tmp_path / "m.safetensors")
    assert not report.checksums and report.chunks == 0 and report.kind == "safetensors"
    assert "no checksums" in str(report)


# --- chunk_bounds --------------------------------------------------------------------------------


def test_chunk_bounds(tmp_path: Path) -> None:
    build(tmp_path)
    index = read_index(tmp_path)
    for k in range(10):
        assert chunk_bounds(index, 0, k) == (k * CHUNK, (k + 1) * CHUNK)
    with pytest.raises(IndexError):
        chunk_bounds(index, 0, 10)


def test_chunk_bounds_short_last_chunk(tmp_path: Path) -> None:
    write(draft([make("a", "uint8", (5000,))], chunk_bytes=CHUNK * 3), tmp_path)
    index = read_index(tmp_path)
    assert chunk_bounds(index, 0, 0) == (0, 8192)


def test_chunk_bounds_without_checksums(tmp_path: Path) -> None:
    import json

    header = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\1")
    index = read_index(tmp_path)
    with pytest.raises(ValueError, match="no checksums"):
        chunk_bounds(index, 0, 0)
