from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastckpt.bench import scenarios
from fastckpt.bench.common import MEMORY_FILESYSTEMS, mount_of, resident_fraction
from fastckpt.bench.generate import CheckpointSet


def test_parse_scenarios() -> None:
    assert scenarios.parse_scenarios("tmpfs, cold,cold") == ["tmpfs", "cold"]
    with pytest.raises(ValueError, match="unknown cache state 'hot'"):
        scenarios.parse_scenarios("cold,hot")
    with pytest.raises(ValueError, match="no cache state"):
        scenarios.parse_scenarios(",")


def test_cold_then_warm(tiny_ckpt: CheckpointSet) -> None:
    if mount_of(tiny_ckpt.root).fstype in MEMORY_FILESYSTEMS:
        pytest.skip("checkpoint on a memory filesystem")
    files = list(tiny_ckpt.files_for("safetensors"))
    cold = scenarios.make("cold")
    assert cold.setup(tiny_ckpt, ["safetensors"]) is tiny_ckpt
    info = cold.before_each(tiny_ckpt, files)
    assert info["resident_before"] < 0.1
    assert resident_fraction(list(tiny_ckpt.all_files())) < 0.1  # every form dropped
    warm = scenarios.make("warm")
    assert warm.before_each(tiny_ckpt, files)["resident_before"] > 0.99


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or mount_of("/dev/shm").fstype not in MEMORY_FILESYSTEMS,
    reason="no /dev/shm tmpfs",
)
def test_tmpfs_copies_and_cleans_up(tiny_ckpt: CheckpointSet) -> None:
    sc = scenarios.make("tmpfs")
    here = sc.setup(tiny_ckpt, ["safetensors", "torch"])
    assert here is not None
    try:
        assert here.root.startswith("/dev/shm/")
        for a, b in zip(tiny_ckpt.safetensors_files, here.safetensors_files, strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()
        assert os.path.isfile(os.path.join(here.safetensors_path, "model.safetensors.index.json"))
        assert here.torch_file is not None and os.path.isfile(here.torch_file)
        assert here.fastckpt_dir is None  # not asked for
        assert here.owned == ()
    finally:
        sc.teardown()
    assert not os.path.exists(here.root)


def test_tmpfs_skips_with_a_note(tiny_ckpt: CheckpointSet, tmp_path: Path) -> None:
    sc = scenarios.make("tmpfs", tmpfs_base=str(tmp_path / "absent"))
    assert sc.setup(tiny_ckpt, ["safetensors"]) is None
    assert "does not exist" in sc.notes[0]
    if mount_of(str(tmp_path)).fstype not in MEMORY_FILESYSTEMS:
        sc = scenarios.make("tmpfs", tmpfs_base=str(tmp_path))
        assert sc.setup(tiny_ckpt, ["safetensors"]) is None
        assert "not a memory filesystem" in sc.notes[0]
    if os.path.isdir("/dev/shm") and mount_of("/dev/shm").fstype in MEMORY_FILESYSTEMS:
        sc = scenarios.make("tmpfs", host_copy_bytes=1 << 60)  # no room left for the copy
        assert sc.setup(tiny_ckpt, ["safetensors"]) is None
        assert "needs" in sc.notes[0]


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or mount_of("/dev/shm").fstype not in MEMORY_FILESYSTEMS,
    reason="no /dev/shm tmpfs",
)
def test_tmpfs_drops_forms_that_do_not_fit(
    tiny_ckpt: CheckpointSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    st_bytes = sum(os.path.getsize(f) for f in tiny_ckpt.safetensors_files) + 64 * 1024
    avail = 512 * 1024 * 1024 + int(st_bytes * 1.06)  # room for the safetensors form only
    monkeypatch.setattr(scenarios, "meminfo", lambda: {"MemAvailable": avail})
    sc = scenarios.make("tmpfs")
    here = sc.setup(tiny_ckpt, ["safetensors", "torch", "fastckpt"])
    assert here is not None
    try:
        assert sc.serves("safetensors") and not sc.serves("torch") and not sc.serves("fastckpt")
        assert here.torch_file is None and here.fastckpt_dir is None
        assert any("no room for the torch form" in n for n in sc.notes)
        assert os.path.isfile(here.safetensors_files[0])
    finally:
        sc.teardown()
