from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fastckpt.io_engine import Engine, engine_info

# Odd sizes on purpose: a tail that is not a multiple of the 4 KiB block.
DATA_NBYTES = (1 << 20) + 4096 * 3 + 1234
SHM = Path("/dev/shm")


def as_array(buf: object) -> np.ndarray:
    """A uint8 numpy view of any buffer (keeps it alive)."""
    return np.frombuffer(memoryview(buf), dtype=np.uint8)  # type: ignore[arg-type]


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


def write_file(path: Path, data: np.ndarray) -> Path:
    with open(path, "wb") as fh:
        fh.write(data.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    return path


def uring_usable() -> bool:
    return bool(engine_info("auto")["uring_usable"])


needs_uring = pytest.mark.skipif(not uring_usable(), reason="io_uring not usable here")

# Every backend the engine can run reads on. "auto" routes O_DIRECT reads to io_uring and
# buffered ones to the pread pool, so it exercises both in one engine.
BACKENDS = [
    pytest.param("uring", marks=needs_uring),
    "pread",
    pytest.param("auto", marks=needs_uring),
]


@pytest.fixture(scope="session")
def data() -> np.ndarray:
    return random_bytes(DATA_NBYTES, seed=1)


@pytest.fixture(scope="session")
def disk_file(tmp_path_factory: pytest.TempPathFactory, data: np.ndarray) -> Path:
    """The data in a file on the disk filesystem of /tmp (ext4 here)."""
    return write_file(tmp_path_factory.mktemp("engine") / "data.bin", data)


@pytest.fixture(scope="session")
def shm_file(data: np.ndarray) -> Iterator[Path]:
    """The data in a file on tmpfs (/dev/shm)."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    fd, name = tempfile.mkstemp(dir=SHM, prefix="fastckpt-test-")
    os.close(fd)
    path = write_file(Path(name), data)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(params=["disk", "shm"])
def data_file(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_file")


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    # Small chunks so that even small requests are split into several pieces.
    with Engine(request.param, queue_depth=8, threads=3, chunk_bytes=8192) as e:
        yield e
