from __future__ import annotations

from pathlib import Path

import pytest

from fastckpt.bench.generate import CheckpointSet, generate_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> CheckpointSet:
    """A ~1.2 MB LLaMA-like checkpoint in all three forms (fastckpt form when convert works)."""
    work: Path = tmp_path_factory.mktemp("bench-ckpt")
    ckpt, _ = generate_checkpoint(str(work), 1_200_000, seed=3, shard_bytes=400_000)
    return ckpt
