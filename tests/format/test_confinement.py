"""Issue #8 items 1-3: a load is one consistent snapshot, stays inside its directory, never hangs.

Files the checkpoint names are opened once beneath the directory (fastckpt.format.fsdir); these
tests attack that from outside: a second process republishing, symbolic links, FIFOs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastckpt
from fastckpt.errors import MissingPartitionError, SymlinkLoopError, UnsafePathError
from fastckpt.format import fsdir

# --- item 1: a load racing a republish -------------------------------------------------------

_REPUBLISH = textwrap.dedent(
    """
    import sys, time, torch, fastckpt
    path, duration = sys.argv[1], float(sys.argv[2])
    def gen(k):
        # Different layouts: tensor sizes, order and partitioning all change with k.
        n = 300 + 700 * (k % 2)
        sd = {f"t{i}": torch.full((n + 37 * i,), float(k), dtype=torch.float32) for i in range(6)}
        if k % 2:
            sd = dict(reversed(list(sd.items())))
        return sd
    # republish until the reader closes our stdin (or for at most `duration` seconds)
    import select
    k = 0
    print("ready", flush=True)
    stop = time.time() + duration
    while time.time() < stop and not select.select([sys.stdin], [], [], 0)[0]:
        k += 1
        fastckpt.save(gen(k), path, overwrite=True, partition_bytes=4096 * (1 + k % 3))
    print(k)
    """
)


def test_load_racing_republish_is_never_mixed(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    fastckpt.save({"t0": torch.zeros(1)}, path)
    writer = subprocess.Popen(
        [sys.executable, "-c", _REPUBLISH, str(path), "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    loads = mixed = errors = 0
    seen: set[int] = set()  # generations loaded: the loads raced that many republishes
    try:
        while writer.poll() is None and (loads < 300 or len(seen) < 20):
            try:
                sd = fastckpt.load(path, verify=False)
            except (fastckpt.FormatError, FileNotFoundError):
                errors += 1  # a specific error is allowed; wrong bytes are not
                continue
            loads += 1
            values = {float(v) for t in sd.values() for v in t.unique()}
            sizes = {n: t.numel() for n, t in sd.items()}
            if len(values) != 1:
                mixed += 1
                continue
            k = int(values.pop())
            seen.add(k)
            if k and sizes != {f"t{i}": 300 + 700 * (k % 2) + 37 * i for i in range(6)}:
                mixed += 1
    finally:
        writer.stdin.close()  # the writer stops at its next republish
        out = writer.stdout.read()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    republished = int(out.strip())
    assert republished > 10 and len(seen) >= 20, "the writer must actually race the loads"
    assert loads >= 300
    assert mixed == 0, f"{mixed} of {loads} loads mixed two generations ({errors} errors)"


# --- item 2: symbolic links ----------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    fastckpt.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    return path


def _relink(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


def test_partition_symlink_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 4096)
    _relink(ckpt / "part-00000.fckpt", str(secret))
    for call in (fastckpt.read_index, fastckpt.load, fastckpt.verify):
        with pytest.raises(UnsafePathError) as exc:
            call(ckpt)
        assert "4096" not in str(exc.value)  # nothing about the outside file leaks
    _relink(ckpt / "part-00000.fckpt", "../secret.bin")
    with pytest.raises(UnsafePathError):
        fastckpt.load(ckpt)


def test_symlink_inside_the_directory_is_followed(ckpt: Path) -> None:
    os.rename(ckpt / "part-00000.fckpt", ckpt / "data.bin")
    os.symlink("data.bin", ckpt / "part-00000.fckpt")
    assert torch.equal(fastckpt.load(ckpt)["w"], torch.arange(1000, dtype=torch.float32))


@pytest.mark.parametrize("loop", [["part-00000.fckpt"], ["a", "b"]])
def test_symlink_loop_is_a_format_error(ckpt: Path, loop: list[str]) -> None:
    (ckpt / "part-00000.fckpt").unlink()
    if len(loop) == 1:
        os.symlink("part-00000.fckpt", ckpt / "part-00000.fckpt")
    else:
        os.symlink("a", ckpt / "part-00000.fckpt")
        os.symlink("b", ckpt / "a")
        os.symlink("a", ckpt / "b")
    with pytest.raises(SymlinkLoopError):
        fastckpt.load(ckpt)


def test_carried_file_symlink_outside_is_not_copied(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "model"
    src.mkdir()
    save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (tmp_path / "secret.txt").write_text("password")
    os.symlink("../secret.txt", src / "config.json")
    with pytest.raises(UnsafePathError):
        fastckpt.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hf_cache(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"w": torch.arange(8.0)}, str(repo / "blobs" / "f00d"))
    (repo / "blobs" / "c0nf").write_text("{}")
    os.symlink("../../blobs/f00d", snap / "model.safetensors")
    os.symlink("../../blobs/c0nf", snap / "config.json")
    return snap


def test_hugging_face_cache_snapshot_loads(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path)
    assert torch.equal(fastckpt.load(snap)["w"], torch.arange(8.0))
    assert fastckpt.read_index(snap).files == ("config.json",)
    out = fastckpt.convert(snap, tmp_path / "out")
    assert out.files == ("config.json",)


def test_hugging_face_snapshot_link_leaving_the_repo_is_refused(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path)
    (tmp_path / "elsewhere.safetensors").write_bytes(
        (snap / "model.safetensors").resolve().read_bytes()
    )
    _relink(snap / "model.safetensors", "../../../elsewhere.safetensors")
    with pytest.raises(UnsafePathError):
        fastckpt.load(snap)


@pytest.mark.parametrize("use_openat2", [True, False])
def test_open_beneath_both_implementations(tmp_path: Path, use_openat2: bool) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    (tmp_path / "out").write_text("y")
    os.symlink("sub/f", root / "ok")
    os.symlink("../f", root / "sub" / "up")  # stays beneath root
    os.symlink("../out", root / "esc")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("loop", root / "loop")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in ("ok", "sub/f", "sub/../sub/f"):
            f = fsdir.open_beneath(fd, rel, use_openat2=use_openat2)
            assert os.read(f, 1) == b"x"
            os.close(f)
        (root / "f").write_text("z")
        f = fsdir.open_beneath(fd, "sub/up", use_openat2=use_openat2)
        assert os.read(f, 1) == b"z"
        os.close(f)
        for rel in ("esc", "abs", "../out", "sub/../../out"):
            with pytest.raises(OSError) as exc:
                fsdir.open_beneath(fd, rel, use_openat2=use_openat2)
            assert exc.value.errno == 18  # EXDEV
        with pytest.raises(OSError) as exc:
            fsdir.open_beneath(fd, "loop", use_openat2=use_openat2)
        assert exc.value.errno == 40  # ELOOP
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_openat2", [True, False])
def test_checkpoint_dir_refuses_escape_either_way(
    ckpt: Path, tmp_path: Path, use_openat2: bool
) -> None:
    (tmp_path / "x").write_bytes(b"0" * 4096)
    _relink(ckpt / "part-00000.fckpt", "../x")
    d = fsdir.CheckpointDir(str(ckpt), use_openat2=use_openat2)
    with d, pytest.raises(UnsafePathError):
        d.open("part-00000.fckpt", error=MissingPartitionError, what="partition")


# --- item 3: FIFOs never block ---------------------------------------------------------------


@pytest.fixture
def alarm() -> object:
    def fail(*_: object) -> None:
        raise TimeoutError("blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield None
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_partition_never_blocks(ckpt: Path, alarm: object) -> None:
    (ckpt / "part-00000.fckpt").unlink()
    os.mkfifo(ckpt / "part-00000.fckpt")
    for call in (fastckpt.read_index, fastckpt.load, fastckpt.verify):
        with pytest.raises(MissingPartitionError, match="not a regular file"):
            call(ckpt)


def test_fifo_never_blocks_the_engine(tmp_path: Path, alarm: object) -> None:
    from fastckpt import io_engine

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        io_engine.File(tmp_path / "fifo")
    with pytest.raises(OSError):
        io_engine.residency(tmp_path / "fifo")


@pytest.mark.parametrize("kind", ["uring", "pread"])
def test_engine_reads_the_descriptor_it_was_given(tmp_path: Path, kind: str) -> None:
    """io_engine.File(fd=...) reads the open file, whatever the path names now (O_DIRECT too)."""
    from fastckpt import io_engine

    path = tmp_path / "f"
    path.write_bytes(b"a" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.rename(path, tmp_path / "old")
        path.write_bytes(b"b" * 8192)
        try:
            engine = io_engine.Engine(kind)
        except OSError:
            pytest.skip(f"{kind} is not available here")
        with engine:
            for direct in (True, False):
                f = io_engine.File(path, fd=fd, direct=direct)
                buf = io_engine.AlignedBuffer(8192)
                engine.read([(f, 0, 8192, buf, 0, 0)])
                assert bytes(memoryview(buf)) == b"a" * 8192
                assert io_engine.residency(path, fd=fd) >= 0.0
                f.close()
        assert os.read(fd, 1) == b"a"  # the caller's descriptor stays open
    finally:
        os.close(fd)
