"""``fastckpt cache``: ls / size / clear of the SSD tier, the read-mode profile and probe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastckpt
from fastckpt.cli import main


def test_ls_size_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ssd = tmp_path / "ssd"
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(5000, dtype=torch.float32)}, str(src))
    with fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=str(ssd)) as loader:
        loader.load(src)
        assert loader.conversions.wait(60)  # the copy is made after the load
    assert main(["cache", "ls", "--dir", str(ssd), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 1 and entries[0]["source"] == os.path.realpath(src)
    assert entries[0]["nbytes"] > 20000
    assert main(["cache", "size", "--dir", str(ssd)]) == 0
    assert int(capsys.readouterr().out.split()[0]) == entries[0]["nbytes"]
    assert main(["cache", "clear", "--dir", str(ssd)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert main(["cache", "ls", "--dir", str(ssd)]) == 0
    assert "(empty)" in capsys.readouterr().out


def test_probe_then_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "blob"
    data.write_bytes(os.urandom(1 << 20) * 9)
    assert main(["cache", "probe", str(data), "--bytes", str(8 << 20)]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "stored in" in out
    assert main(["cache", "profile", "--json"]) == 0
    profiles = json.loads(capsys.readouterr().out)
    assert len(profiles) == 1
    p = profiles[0]
    assert p["source"] == "probe" and p["probe_bytes"] == 8 << 20
    assert p["buffered_gbps"] > 0 and p["best"] in ("direct", "buffered", "mixed")


def test_probe_refuses_small_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 4096)
    assert main(["cache", "probe", str(small), "--bytes", str(8 << 20)]) == 1
    assert "too small" in capsys.readouterr().err
