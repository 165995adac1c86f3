"""Bitwise-correct reads: random ranges, sizes, alignments and destination offsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastckpt.io_engine import AlignedBuffer, Engine, File

from .conftest import BACKENDS, DATA_NBYTES, as_array

SENTINEL = 0xA5
PAGE = 4096


@st.composite
def read_plans(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """Lists of (file_offset, nbytes, dest_offset) into one destination, non-overlapping."""
    plans = []
    dest_cursor = draw(st.integers(0, 3 * PAGE))
    for _ in range(draw(st.integers(1, 6))):
        aligned = draw(st.booleans())  # favour ranges the O_DIRECT path can take
        if aligned:
            offset = draw(st.integers(0, DATA_NBYTES // PAGE)) * PAGE
        else:
            offset = draw(st.integers(0, DATA_NBYTES))
        max_n = DATA_NBYTES - offset
        nbytes = draw(
            st.one_of(
                st.integers(0, min(max_n, 3 * PAGE)),
                st.integers(0, max_n),
                st.just(max_n),  # up to the (unaligned) end of the file
            )
        )
        if draw(st.booleans()):
            # Same remainder mod 4096 as the file offset: the middle can be read with O_DIRECT.
            dest_offset = (dest_cursor + PAGE - 1) // PAGE * PAGE + offset % PAGE
        else:
            dest_offset = dest_cursor + draw(st.integers(0, 64))
        plans.append((offset, nbytes, dest_offset))
        dest_cursor = dest_offset + nbytes
    return plans


def check(dest: np.ndarray, data: np.ndarray, plans: list[tuple[int, int, int]]) -> None:
    expected = np.full_like(dest, SENTINEL)
    for offset, nbytes, dest_offset in plans:
        expected[dest_offset : dest_offset + nbytes] = data[offset : offset + nbytes]
    mismatch = np.flatnonzero(dest != expected)
    assert mismatch.size == 0, f"{mismatch.size} bytes differ, first at {mismatch[0]}: {plans}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["disk", "shm"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plans=read_plans(), dest_kind=st.sampled_from(["aligned", "bytearray", "numpy"]))
def test_random_reads_are_bitwise_exact(
    request: pytest.FixtureRequest,
    data: np.ndarray,
    backend: str,
    where: str,
    plans: list[tuple[int, int, int]],
    dest_kind: str,
) -> None:
    path = request.getfixturevalue(f"{where}_file")
    size = max(o + n for _, n, o in plans) + 17
    dest_obj: object
    if dest_kind == "aligned":
        dest_obj = AlignedBuffer(size)
        view = as_array(dest_obj)
    elif dest_kind == "bytearray":
        dest_obj = bytearray(size)
        view = as_array(dest_obj)
    else:
        dest_obj = view = np.empty(size, dtype=np.uint8)
    view[:] = SENTINEL
    with Engine(backend, queue_depth=4, threads=2, chunk_bytes=8192) as engine, File(path) as f:
        reads = [(f, o, n, dest_obj, d, i) for i, (o, n, d) in enumerate(plans)]
        with engine.submit(reads) as batch:
            seen: list[int] = []
            while tags := batch.wait():
                seen.extend(tags)
        assert sorted(seen) == list(range(len(plans)))
        assert batch.done and batch.pending == 0
    check(view, data, plans)


def test_disk_file_uses_o_direct(disk_file: Path, shm_file: Path) -> None:
    with File(disk_file) as f:
        if not f.direct:
            pytest.skip(f"the filesystem of {disk_file} refuses O_DIRECT: {f.direct_note}")
    with File(shm_file) as f:
        assert not f.direct  # tmpfs: nothing to bypass
        assert "tmpfs" in f.direct_note
    with File(disk_file, direct=False) as f:
        assert not f.direct


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_middle_goes_through_o_direct(
    disk_file: Path, data: np.ndarray, backend: str
) -> None:
    with File(disk_file) as f, Engine(backend, chunk_bytes=16384) as engine:
        if not f.direct:
            pytest.skip("no O_DIRECT on this filesystem")
        buf = AlignedBuffer(DATA_NBYTES + PAGE)
        # Unaligned start and end, same remainder mod 4096 in file and memory.
        offset, nbytes = 1000, DATA_NBYTES - 1000
        engine.read([(f, offset, nbytes, buf, offset, 0)])
        got = as_array(buf)[offset : offset + nbytes]
        assert np.array_equal(got, data[offset:])
        # Everything but the head (< 4 KiB) and the tail (< 4 KiB) bypassed the page cache.
        assert engine.bytes_read == nbytes
        assert nbytes - 2 * PAGE < engine.bytes_direct <= nbytes
        # Misaligned relative to memory: all of it is a buffered read, still exact.
        engine.read([(f, offset, nbytes, buf, 0, 1)])
        assert np.array_equal(as_array(buf)[:nbytes], data[offset:])
        assert engine.bytes_direct < nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_file_in_one_request(data_file: Path, data: np.ndarray, backend: str) -> None:
    with Engine(backend, chunk_bytes=64 << 10) as engine, File(data_file) as f:
        buf = AlignedBuffer(f.size)
        engine.read([(f, 0, f.size, buf, 0, 42)])
        assert np.array_equal(as_array(buf), data)


def test_torch_pinned_style_destination(disk_file: Path, data: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    t = torch.empty(5000, dtype=torch.uint8)
    with Engine() as engine, File(disk_file) as f:
        engine.read([(f, 123, 5000, t.numpy(), 0, 0)])
    assert bytes(t.numpy()) == data[123:5123].tobytes()


def test_views_of_aligned_buffer_keep_it_alive() -> None:
    torch = pytest.importorskip("torch")
    buf = AlignedBuffer(3 << 20)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    a = as_array(buf)
    del buf
    t[:] = 7
    assert int(a[-1]) == 7 and a.size == 3 << 20


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, (2 << 20) + 1])
def test_aligned_buffer(nbytes: int) -> None:
    buf = AlignedBuffer(nbytes)
    assert buf.nbytes == len(buf) == nbytes
    view = memoryview(buf)
    assert view.readonly is False and view.format == "B" and view.ndim == 1
    assert view.nbytes == nbytes
    arr = as_array(buf)
    if nbytes:
        assert arr.ctypes.data % PAGE == 0
        assert not arr.any()  # zero-filled
        arr[:] = 1
    if nbytes >= 2 << 20:
        assert arr.ctypes.data % (2 << 20) == 0


def test_aligned_buffer_rejects_negative_size() -> None:
    with pytest.raises(ValueError, match="nbytes"):
        AlignedBuffer(-1)
