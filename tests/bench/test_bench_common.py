from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastckpt.bench import common
from fastckpt.bench.common import (
    drop_from_page_cache,
    median,
    mount_of,
    read_through,
    resident_bytes,
    resident_fraction,
)


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def _write(path: Path, nbytes: int) -> None:
    with open(path, "wb") as fh:
        fh.write(os.urandom(nbytes))
        fh.flush()
        os.fsync(fh.fileno())


def test_residency_follows_reads_and_drops(tmp_path: Path) -> None:
    if mount_of(str(tmp_path)).fstype in common.MEMORY_FILESYSTEMS:
        pytest.skip("tmp_path is on a memory filesystem: nothing can be dropped")
    path = tmp_path / "data.bin"
    size = 4 << 20
    _write(path, size)
    drop_from_page_cache([str(path)])
    held, total = resident_bytes(str(path))
    assert total == size
    assert held < size // 10
    assert read_through([str(path)], chunk_bytes=1 << 20, threads=3) == size
    assert resident_fraction([str(path)]) > 0.95
    drop_from_page_cache([str(path)])
    assert resident_fraction([str(path)]) < 0.1


def test_residency_of_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert resident_bytes(str(path)) == (0, 0)
    assert resident_fraction([str(path)]) == 1.0


def test_drop_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        drop_from_page_cache([str(tmp_path / "nope")])


def test_mount_of_root_and_shm() -> None:
    assert mount_of("/").mountpoint == "/"
    if os.path.isdir("/dev/shm"):
        assert mount_of("/dev/shm").fstype in common.MEMORY_FILESYSTEMS


def test_machine_helpers() -> None:
    from fastckpt.rules.host import meminfo

    assert meminfo().get("MemTotal", 0) > 0
    assert common.cpu_model()
