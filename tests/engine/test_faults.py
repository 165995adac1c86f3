"""Bad input and failing I/O: each gives a clear error or a stated fallback, never a short read."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fastckpt import _core
from fastckpt.io_engine import AlignedBuffer, Engine, File, engine_info

from .conftest import BACKENDS, DATA_NBYTES, as_array, needs_uring, random_bytes, write_file


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError) as info:
        File(missing)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(missing)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as info:
        File(tmp_path)
    assert info.value.filename == str(tmp_path)


def test_path_types(disk_file: Path) -> None:
    for p in (disk_file, str(disk_file), os.fsencode(disk_file)):
        with File(p) as f:  # type: ignore[arg-type]
            assert f.path == str(disk_file) and f.size == DATA_NBYTES
    with pytest.raises(ValueError, match="NUL"):
        File(str(disk_file) + "\0x")


@pytest.fixture
def shrinking_file(tmp_path: Path) -> Iterator[Path]:
    path = write_file(tmp_path / "shrinks.bin", random_bytes(64 << 10, seed=3))
    yield path


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_shrunk_after_open_is_caught_at_submit(shrinking_file: Path, backend: str) -> None:
    with Engine(backend) as engine, File(shrinking_file) as f:
        assert f.size == 64 << 10
        os.truncate(shrinking_file, 10_000)
        buf = AlignedBuffer(64 << 10)
        with pytest.raises(ValueError) as info:
            engine.submit([(f, 0, 4096, buf, 0, 0), (f, 8192, 4096, buf, 8192, 1)])
        msg = str(info.value)
        assert "read 1" in msg and str(shrinking_file) in msg
        assert "10000 bytes" in msg and "65536 bytes when opened" in msg
        # The reads that still fit are fine.
        engine.read([(f, 0, 10_000, buf, 0, 0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [True, False])
def test_file_shrunk_after_planning_raises_not_short_read(
    shrinking_file: Path, backend: str, direct: bool
) -> None:
    data = shrinking_file.read_bytes()
    with Engine(backend, chunk_bytes=8192) as engine, File(shrinking_file, direct=direct) as f:
        os.truncate(shrinking_file, 20_000)
        buf = AlignedBuffer(64 << 10)
        # The test hook skips the submit-time size check, as if the file shrank just after it.
        with pytest.raises(OSError) as info:
            engine.submit([(f, 0, 64 << 10, buf, 0, 0)], _check_file_size=False).wait_all()
        e = info.value
        assert e.errno == errno.ENODATA
        assert e.filename == str(shrinking_file)
        assert "unexpected end of file at offset" in str(e)
        assert "bytes missing" in str(e)
        # A read within the new size still works, and is exact.
        engine.read([(f, 0, 20_000, buf, 0, 0)])
        assert bytes(memoryview(buf)[:20_000]) == data[:20_000]


@pytest.mark.parametrize("backend", BACKENDS)
def test_destination_too_small(disk_file: Path, backend: str) -> None:
    with Engine(backend) as engine, File(disk_file) as f:
        dest = bytearray(100)
        with pytest.raises(ValueError, match=r"read 1 .*destination range \[50, 150\).*100 bytes"):
            engine.submit([(f, 0, 100, dest, 0, 0), (f, 0, 100, dest, 50, 1)])
        # Nothing was queued, and the destination was released (resizable again).
        dest.extend(b"x")


def test_range_past_end_of_file(disk_file: Path) -> None:
    with Engine() as engine, File(disk_file) as f:
        dest = AlignedBuffer(8192)
        with pytest.raises(ValueError, match=r"read 0 .*ends at byte"):
            engine.submit([(f, DATA_NBYTES - 10, 11, dest, 0, 0)])
        with pytest.raises(ValueError, match=r"ends at byte"):
            engine.submit([(f, DATA_NBYTES + 1, 0, dest, 0, 0)])
        with pytest.raises(ValueError, match=r"ends at byte"):  # no overflow trickery
            engine.submit([(f, 2**63 - 1, 2**63 - 1, dest, 0, 0)])
        engine.read([(f, DATA_NBYTES, 0, dest, 0, 0)])  # empty read at the very end is fine


@pytest.mark.parametrize(
    ("read", "exc", "pattern"),
    [
        (lambda f, d: ("not a file", 0, 1, d, 0, 0), TypeError, "expected a fastckpt File"),
        (lambda f, d: (f, -1, 1, d, 0, 0), ValueError, "file_offset must be >= 0"),
        (lambda f, d: (f, 0, -5, d, 0, 0), ValueError, "nbytes must be >= 0"),
        (lambda f, d: (f, 0, 1, d, -1, 0), ValueError, "dest_offset must be >= 0"),
        (lambda f, d: (f, 0.5, 1, d, 0, 0), TypeError, "file_offset must be an int"),
        (lambda f, d: (f, 0, 1, d, 0, "t"), TypeError, "tag must be an int"),
        (lambda f, d: (f, 0, 1, d, 0), ValueError, "expected 6 items"),
        (lambda f, d: (f, 0, 1, b"readonly", 0, 0), TypeError, "writable C-contiguous"),
        (lambda f, d: (f, 0, 1, np.zeros((4, 4), np.uint8)[:, 1], 0, 0), TypeError, "contiguous"),
        (lambda f, d: (f, 0, 1, 12345, 0, 0), TypeError, "writable C-contiguous"),
        (lambda f, d: 7, TypeError, "expected a tuple"),
    ],
)
def test_bad_reads(
    disk_file: Path, read: Callable[[File, bytearray], object], exc: type[Exception], pattern: str
) -> None:
    with Engine() as engine, File(disk_file) as f:
        dest = bytearray(16)
        with pytest.raises(exc, match=pattern):
            engine.submit([(f, 0, 1, dest, 0, 0), read(f, dest)])  # type: ignore[list-item]
        dest.extend(b"x")  # the first read's buffer was released


def test_closed_file_and_engine(disk_file: Path) -> None:
    engine = Engine()
    f = File(disk_file)
    f.close()
    f.close()  # idempotent
    assert f.closed
    with pytest.raises(ValueError, match="is closed"):
        engine.submit([(f, 0, 1, bytearray(1), 0, 0)])
    engine.close()
    engine.close()
    assert engine.closed
    with File(disk_file) as g, pytest.raises(ValueError, match="engine is closed"):
        engine.submit([(g, 0, 1, bytearray(1), 0, 0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_injected_io_error(disk_file: Path, backend: str, direct: bool, err: int) -> None:
    with (
        Engine(backend, chunk_bytes=8192, _fault_after_bytes=100_000, _fault_errno=err) as engine,
        File(disk_file, direct=direct) as f,
    ):
        buf = AlignedBuffer(DATA_NBYTES)
        batch = engine.submit([(f, i * 65536, 65536, buf, i * 65536, i) for i in range(16)])
        got: list[int] = []
        with pytest.raises(OSError) as info:
            while tags := batch.wait():
                got.extend(tags)
        assert info.value.errno == err
        assert info.value.filename == str(disk_file)
        assert "injected fault" in str(info.value) and "at offset" in str(info.value)
        assert len(got) < 16  # never reported as complete
        assert batch.done and batch.pending == 0
        with pytest.raises(OSError):  # the failure is sticky
            batch.wait()
        batch.cancel()  # and cancelling afterwards is harmless


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_kernel_read_error(tmp_path: Path, backend: str) -> None:
    # A directory opened for reading exists and has a size, but read(2) fails with EISDIR.
    with Engine(backend) as engine, File(tmp_path, _allow_special=True) as d:
        if d.size == 0:
            pytest.skip("directory reports size 0 on this filesystem")
        with pytest.raises(IsADirectoryError) as info:
            engine.read([(d, 0, 1, bytearray(1), 0, 0)])
        assert info.value.filename == str(tmp_path)
        assert "at offset 0" in str(info.value)


@pytest.fixture
def uring_refused() -> Iterator[None]:
    _core._set_uring_setup_fault(errno.EPERM)
    try:
        yield
    finally:
        _core._set_uring_setup_fault(0)


@needs_uring  # the hook acts on a real io_uring setup
def test_uring_refused_falls_back_to_pread(
    uring_refused: None, disk_file: Path, data: np.ndarray
) -> None:
    info = engine_info("auto")
    assert info["name"] == "pread" and not info["uring_usable"]
    assert "io_uring unavailable" in info["reason"] and "Operation not permitted" in info["reason"]
    assert info["uring_error"]
    with Engine("auto") as engine, File(disk_file) as f:
        assert engine.name == "pread" and "io_uring unavailable" in engine.reason
        buf = AlignedBuffer(DATA_NBYTES)
        engine.read([(f, 0, DATA_NBYTES, buf, 0, 0)])
        assert np.array_equal(as_array(buf), data)
    with pytest.raises(PermissionError, match="io_uring was requested but is unavailable"):
        Engine("uring")
    with pytest.raises(PermissionError):
        engine_info("uring")


@needs_uring
def test_uring_hook_reset_restores_uring() -> None:
    _core._set_uring_setup_fault(errno.ENOSYS)
    try:
        assert engine_info("auto")["name"] == "pread"
        assert "kernel without io_uring" in engine_info("auto")["reason"]
    finally:
        _core._set_uring_setup_fault(0)
    with Engine("auto") as engine:
        assert engine.name == "io_uring"


def test_engine_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="queue_depth"):
        Engine(queue_depth=0)
    with pytest.raises(ValueError, match="threads"):
        Engine(threads=0)
    with pytest.raises(ValueError, match="multiple of 4096"):
        Engine(chunk_bytes=5000)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Engine(chunk_bytes=0)
    with pytest.raises(ValueError, match="expected one of auto, uring, pread"):
        Engine("spdk")


def test_no_leaked_descriptors(disk_file: Path) -> None:
    if not os.path.isdir("/proc/self/fd") or shutil.which("true") is None:
        pytest.skip("no /proc")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with Engine() as engine, File(disk_file) as f:
            engine.read([(f, 0, 4096, AlignedBuffer(4096), 0, 0)])
    assert len(os.listdir("/proc/self/fd")) == before
