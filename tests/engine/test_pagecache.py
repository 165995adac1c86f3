"""residency() and drop_page_cache()."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastckpt import _core
from fastckpt.io_engine import drop_page_cache, residency

from .conftest import random_bytes, write_file

METHODS = ["auto", "mincore", *(["cachestat"] if _core.cachestat_available() else [])]


@pytest.fixture
def cached_file(tmp_path: Path) -> Path:
    return write_file(tmp_path / "f.bin", random_bytes(4 << 20, seed=5))


@pytest.mark.parametrize("method", METHODS)
def test_drop_then_read_back(cached_file: Path, method: str) -> None:
    drop_page_cache(cached_file)
    dropped = _core.residency(cached_file, method)
    if dropped > 0.5:
        pytest.skip(f"this filesystem keeps pages after DONTNEED ({dropped:.0%} resident)")
    cached_file.read_bytes()
    assert _core.residency(cached_file, method) == pytest.approx(1.0)
    assert 0.0 <= dropped < 0.5


def test_methods_agree(cached_file: Path) -> None:
    drop_page_cache(cached_file)
    if residency(cached_file) > 0.01:
        pytest.skip("this filesystem keeps pages after DONTNEED")
    fd = os.open(cached_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly what is read
        os.pread(fd, 1 << 20, 0)  # a quarter of the file
    finally:
        os.close(fd)
    for method in METHODS:
        assert _core.residency(cached_file, method) == pytest.approx(0.25, abs=0.01), method


def test_empty_file_is_resident(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    assert residency(empty) == 1.0
    drop_page_cache(empty)


def test_tmpfs_is_always_resident(shm_file: Path) -> None:
    drop_page_cache(shm_file)  # nothing to drop: tmpfs pages are the file
    assert residency(shm_file) == pytest.approx(1.0)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        residency(tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        drop_page_cache(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        residency(tmp_path)
    with pytest.raises(ValueError, match="method"):
        _core.residency(tmp_path, "guess")


@pytest.mark.parametrize("method", METHODS)
def test_sampled_estimate_tracks_the_exact_count(tmp_path: Path, method: str) -> None:
    path = write_file(tmp_path / "big.bin", random_bytes(64 << 20, seed=9))
    drop_page_cache(path)
    if _core.residency(path, method) > 0.01:
        pytest.skip("this filesystem keeps pages after DONTNEED")
    assert _core.residency(path, method, 32) == 0.0
    # read the first half: the estimate must say about half, like the exact count
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 32 << 20, 0)
    finally:
        os.close(fd)
    exact = _core.residency(path, method)
    sampled = _core.residency(path, method, 32)
    assert 0.3 < exact < 0.7
    assert abs(sampled - exact) < 0.1
    path.read_bytes()
    assert _core.residency(path, method, 32) == pytest.approx(1.0)
