"""The cache daemon's copies are a byte source of the one load core: FORMAT.md's rules hold for
them exactly as for the files (tests/loader/test_one_core.py checks the other entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fastckpt
from fastckpt.errors import CorruptDataError
from fastckpt.loader.api import load_via_server


def test_the_daemons_copy_is_held_to_the_bool_rule(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    path = root / "ck"
    fastckpt.save({"mask": torch.tensor([True, False] * 64)}, path, metadata=None)
    entry = fastckpt.read_index(path).tensors["mask"]
    with open(fastckpt.read_index(path).partitions[0].path, "r+b") as f:
        f.seek(entry.offset)
        f.write(b"\x07")
    d = daemon_factory(str(root), "4MiB", "--no-verify")
    with pytest.raises(CorruptDataError, match="bool"):
        load_via_server(path, server=d.socket)
