"""The SSD tier keys copies by content, drops a copy that fails a check (rebuilding it, with a
warning), and falls back to the source when its disk is full (nothing half-written kept).

Each check runs with both ways of making a copy (``ssd_convert``): ``inline`` (a load that finds
no usable copy converts first and reads the new copy) and ``background`` (it reads the source,
and the copy is made after it: ``settle`` waits for that)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastckpt
from fastckpt.errors import CacheWarning


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _source(path: Path, seed: int, n: int = 600_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"a": torch.randn(n, generator=g), "b": torch.randn(33, 7, generator=g)}
    save_file(sd, str(path))  # 2.4 MB: more than the first MiB
    return sd


MODES = ["background", "inline"]


def _loader(ssd: Path, budget: int = 64 << 20, mode: str = "background") -> fastckpt.Loader:
    return fastckpt.Loader(ssd_tier_bytes=budget, ssd_tier_dir=str(ssd), ssd_convert=mode)


def settle(loader: fastckpt.Loader) -> None:
    """Wait for the conversions the loads so far started (none with ``inline``)."""
    assert loader.conversions.wait(60)


def _kind_without_copy(mode: str) -> str:
    """What a load that finds no usable copy reads: the new copy (inline) or the source."""
    return "fastckpt" if mode == "inline" else "safetensors"


def _copies(ssd: Path) -> list[Path]:
    return [p for p in ssd.iterdir() if not p.name.startswith(".")]


def _partition(copy: Path) -> Path:
    return next(p for p in sorted(copy.iterdir()) if p.name.startswith("part-"))


@pytest.mark.parametrize("mode", MODES)
def test_a_source_rewritten_past_its_first_mib_with_size_and_mtime_kept_gets_a_new_copy(
    tmp_path: Path, mode: str
) -> None:
    src = tmp_path / "model.safetensors"
    sd = _source(src, seed=1)
    with _loader(tmp_path / "ssd", mode=mode) as loader:
        assert same(loader.load(src), sd)
        settle(loader)
        st = src.stat()
        raw = bytearray(src.read_bytes())
        raw[-4096:] = bytes(4096)  # the tail of tensor "a", past the first MiB
        with open(src, "r+b") as f:
            f.write(bytes(raw))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
        direct = fastckpt.load(src)  # the source as it is now (no tier)
        assert not same(direct, sd)
        got, stats = loader.load(src, stats=True)
        assert stats.kind == _kind_without_copy(mode) and same(got, direct)
        settle(loader)
        got, stats = loader.load(src, stats=True)
        assert stats.kind == "fastckpt" and same(got, direct)  # the new copy
        assert len(_copies(tmp_path / "ssd")) == 2  # the old copy is kept for the old bytes


@pytest.mark.parametrize("mode", MODES)
def test_a_source_whose_metadata_changed_but_not_its_bytes_reuses_its_copy(
    tmp_path: Path, mode: str
) -> None:
    src = tmp_path / "model.safetensors"
    sd = _source(src, seed=2)
    ssd = tmp_path / "ssd"
    with _loader(ssd, mode=mode) as loader:
        assert same(loader.load(src), sd)
        settle(loader)
        os.chmod(src, 0o600)  # a new ctime, the same bytes
        os.utime(src)
        got, stats = loader.load(src, stats=True)
        # inline: hashed first, the copy found; background: the source, hashed after the load
        assert same(got, sd) and stats.kind == _kind_without_copy(mode)
        settle(loader)
        got, stats = loader.load(src, stats=True)
        assert same(got, sd) and stats.kind == "fastckpt"
        info = loader.cache_info()["ssd"]
        assert (info["misses"], info["items"]) == (1, 1)
    assert len(_copies(ssd)) == 1


def _flip(path: Path | str, *, at: int, mask: int) -> None:
    """XOR one byte of ``path`` in place with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


@pytest.mark.parametrize("mode", MODES)
def test_a_copy_written_to_is_evicted_and_rebuilt_with_a_warning(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "model.safetensors"
    sd = _source(src, seed=3)
    ssd = tmp_path / "ssd"
    with _loader(ssd, mode=mode) as loader:
        assert same(loader.load(src), sd)
        settle(loader)
        (copy,) = _copies(ssd)
        part = _partition(copy)
        _flip(part, at=100, mask=0xFF)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, stats = loader.load(src, stats=True)  # no verify: the tier's own check
        assert same(got, sd) and stats.kind == _kind_without_copy(mode)
        assert any(issubclass(w.category, CacheWarning) for w in caught), caught
        settle(loader)
        assert len(_copies(ssd)) == 1
        got, stats = loader.load(src, verify=True, stats=True)
        assert same(got, sd) and stats.kind == "fastckpt"


@pytest.mark.parametrize("mode", MODES)
def test_a_copy_failing_verification_is_evicted_and_rebuilt(tmp_path: Path, mode: str) -> None:
    """Bytes that changed without the file system noticing (media corruption): stamps still
    match, so only verification finds it; the copy goes and a good one replaces it (made
    before the load reads it in both modes: a stock source has no checksums to verify)."""
    src = tmp_path / "model.safetensors"
    sd = _source(src, seed=4)
    ssd = tmp_path / "ssd"
    with _loader(ssd, mode=mode) as loader:
        assert same(loader.load(src), sd)
        settle(loader)
        (copy,) = _copies(ssd)
        part = _partition(copy)
        _flip(part, at=200, mask=0x01)
        _forget_the_write(copy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                assert same(loader.load(src, verify=True), sd)
        assert sum(issubclass(w.category, CacheWarning) for w in caught) == 1, caught


def _forget_the_write(copy: Path) -> None:
    """Make the copy's recorded file stamps match the corrupted files, as if the corruption
    happened below the file system."""
    meta_path = copy / ".source.json"
    if not meta_path.exists():
        return  # before content keys: nothing recorded
    meta = json.loads(meta_path.read_text())
    for rel in meta.get("files", {}):
        st = (copy / rel).stat()
        meta["files"][rel] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    meta_path.write_text(json.dumps(meta))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real ENOSPC for the SSD tier's conversion."""
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(where)], check=True, capture_output=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_during_conversion_reads_the_source_and_says_so_once(
    tmp_path: Path, tiny_disk: Path, mode: str
) -> None:
    src = tmp_path / "model.safetensors"
    sd = _source(src, seed=5)  # 2.4 MB into 1 MiB
    ssd = tiny_disk / "ssd"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _loader(ssd, budget=64 << 20, mode=mode) as loader:
            for _ in range(2):
                got, stats = loader.load(src, stats=True)
                assert same(got, sd) and stats.kind == "safetensors"
                settle(loader)
            # background: not tried again for the same source by this Loader
            done = loader.cache_info()["ssd"]["conversions"]
            assert (done["scheduled"], done["not_kept"]) == ((1, 1) if mode != "inline" else (0, 0))
    said = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(said) == 1 and "space" in str(said[0].message), [str(w.message) for w in caught]
    assert os.listdir(ssd) == []  # nothing half-written kept
