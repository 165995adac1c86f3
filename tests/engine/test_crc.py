"""crc32c() through the engine module: known values and a bit-by-bit reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt import _core
from fastckpt.io_engine import AlignedBuffer, crc32c, crc32c_combine

from .conftest import as_array

BIG = np.random.default_rng(11).integers(0, 256, 200_016, dtype=np.uint8)


def reference_crc32c(data: bytes, value: int = 0) -> int:
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), split=st.integers(0, 600))
def test_matches_reference_and_continues(data: bytes, split: int) -> None:
    split = min(split, len(data))
    assert crc32c(data) == reference_crc32c(data)
    assert crc32c(data[split:], crc32c(data[:split])) == crc32c(data)


def test_buffer_types() -> None:
    raw = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8)
    expected = crc32c(raw.tobytes())
    assert crc32c(raw) == expected
    assert crc32c(memoryview(raw.tobytes())) == expected
    assert crc32c(raw.view(np.uint32)[: 10_000 // 4]) == crc32c(raw[:10_000].tobytes())
    buf = AlignedBuffer(10_000)
    as_array(buf)[:] = raw
    assert crc32c(buf) == expected
    with pytest.raises(TypeError, match="contiguous"):
        crc32c(raw.reshape(100, 100)[:, 3])
    with pytest.raises(TypeError):
        crc32c("text")


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 15),
    nbytes=st.one_of(
        st.integers(0, 300),
        st.integers(3 * 16384 - 8, 3 * 16384 + 8),  # around one 3-stripe round
        st.integers(0, 200_000),
    ),
    value=st.integers(0, 2**32 - 1),
)
def test_fast_path_matches_portable_path(start: int, nbytes: int, value: int) -> None:
    data = BIG[start : start + nbytes]
    assert crc32c(data, value) == _core._crc32c_software(data, value)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=300), value=st.integers(0, 2**32 - 1))
def test_portable_path_matches_reference(data: bytes, value: int) -> None:
    assert _core._crc32c_software(data, value) == reference_crc32c(data, value)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=70_000), st.binary(max_size=70_000))
def test_combine_joins_two_crcs(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
