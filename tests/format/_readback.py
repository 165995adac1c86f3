"""Test helpers: read a checkpoint back without the loader, and check the writer's invariants.

``read_back`` uses only ``read_index`` and ``os.pread`` + ``torch.frombuffer``, so the writer's
tests do not depend on the loader. ``check_partitions`` re-derives what FORMAT.md requires of
partition files (sizes, alignment, zero gaps, chunk checksums) independently of the writer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fastckpt.format import dtypes, spec
from fastckpt.format.index import Index
from fastckpt.format.reader import read_index


def read_back(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor (and alias: the same object as its target) of the checkpoint at ``path``."""
    index = read_index(path)
    out: dict[str, torch.Tensor] = {}
    for entry in index.tensors.values():
        part = index.partitions[entry.partition]
        dt = dtypes.torch_dtype(entry.dtype)
        if entry.nbytes == 0:
            out[entry.name] = torch.empty(entry.shape, dtype=dt)
            continue
        fd = os.open(part.path, os.O_RDONLY)
        try:
            data = os.pread(fd, entry.nbytes, entry.offset)
        finally:
            os.close(fd)
        assert len(data) == entry.nbytes
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out[entry.name] = flat.view(dt).reshape(entry.shape)
    for alias, target in index.aliases.items():
        out[alias] = out[target]
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's logical bytes, C-contiguous (what the format stores)."""
    t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_bitwise_equal(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert raw_bytes(got) == raw_bytes(want), name


def check_partitions(index: Index) -> None:
    """FORMAT.md section 2-3 invariants, recomputed from the files."""
    assert index.kind == "fastckpt"
    chunk = index.checksum_chunk_bytes
    assert chunk is not None and chunk % spec.PAGE == 0
    for p, part in enumerate(index.partitions):
        size = os.path.getsize(part.path)
        assert size == part.nbytes and size % spec.PAGE == 0
        with open(part.path, "rb") as f:
            data = f.read()
        covered = bytearray(size)
        for t in index.tensors.values():
            if t.partition == p:
                assert t.offset % index.alignment == 0
                covered[t.offset : t.end] = b"\x01" * t.nbytes
        gaps = bytes(b for b, c in zip(data, covered, strict=True) if not c)
        assert gaps == bytes(len(gaps)), f"non-zero padding in {part.file}"
        sums = [spec.crc32c(data[k : k + chunk]) for k in range(0, size, chunk)]
        assert list(part.checksums or ()) == sums
