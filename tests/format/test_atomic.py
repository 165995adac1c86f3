"""Atomic publish: overwrite semantics, and failures (ENOSPC, Ctrl-C, bad input) leave nothing."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from _readback import assert_bitwise_equal, read_back

import fastckpt
from fastckpt.errors import DestinationExistsError, FormatError
from fastckpt.format import atomic, spec, writer
from fastckpt.format.reader import read_index


def sd(seed: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(700, generator=g) for i in range(n)}


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def assert_no_temp(parent) -> None:
    leftovers = [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]
    assert leftovers == []


# --- overwrite semantics --------------------------------------------------------------------------


def test_existing_destination_needs_overwrite(tmp_path) -> None:
    old = sd(1)
    fastckpt.save(old, tmp_path / "ck")
    with pytest.raises(DestinationExistsError, match="overwrite") as info:
        fastckpt.save(sd(2), tmp_path / "ck")
    assert isinstance(info.value, FileExistsError)
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(tmp_path / "ck")
    assert_bitwise_equal(old, read_back(tmp_path / "ck"))
    assert listing(tmp_path) == ["ck"]


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces(tmp_path, monkeypatch, exchange) -> None:
    calls: list[bool] = []
    real = atomic._rename_exchange

    def spy(a: str, b: str) -> bool:
        done = real(a, b) if exchange else False
        calls.append(done)
        return done

    monkeypatch.setattr(atomic, "_rename_exchange", spy)
    fastckpt.save(sd(1, n=9), tmp_path / "ck", partition_bytes=4096)
    new = sd(2, n=2)
    index = fastckpt.save(new, tmp_path / "ck", overwrite=True)
    assert len(calls) == 1  # exchange=True uses RENAME_EXCHANGE where the file system has it
    assert len(index.partitions) == 1
    assert listing(tmp_path / "ck") == ["fastckpt.index", "part-00000.fckpt"]
    assert_bitwise_equal(new, read_back(tmp_path / "ck"))
    assert_no_temp(tmp_path)


def test_overwrite_empty_directory(tmp_path) -> None:
    (tmp_path / "ck").mkdir()
    fastckpt.save(sd(1), tmp_path / "ck", overwrite=True)
    read_index(tmp_path / "ck")


@pytest.mark.parametrize("what", ["file", "dir", "symlink"])
def test_overwrite_refuses_non_checkpoints(tmp_path, what) -> None:
    dst = tmp_path / "dst"
    if what == "file":
        dst.write_text("precious")
    elif what == "dir":
        dst.mkdir()
        (dst / "precious.txt").write_text("precious")
    else:
        fastckpt.save(sd(1), tmp_path / "real")
        dst.symlink_to(tmp_path / "real")
    before = listing(tmp_path)
    with pytest.raises(DestinationExistsError, match="only replaces a fastckpt checkpoint"):
        fastckpt.save(sd(2), dst, overwrite=True)
    assert listing(tmp_path) == before


def test_parent_directories_are_created(tmp_path) -> None:
    fastckpt.save(sd(1), tmp_path / "a" / "b" / "ck")
    read_index(tmp_path / "a" / "b" / "ck")


def test_destination_appearing_during_the_write(tmp_path, monkeypatch) -> None:
    dst = tmp_path / "ck"

    def sneaky(self: writer.Progress, n: int) -> None:
        if not dst.exists():
            dst.mkdir()
            (dst / "someone-else.txt").write_text("x")

    monkeypatch.setattr(writer.Progress, "update", sneaky)
    with pytest.raises(DestinationExistsError):
        fastckpt.save(sd(1), dst)
    assert listing(dst) == ["someone-else.txt"]
    assert_no_temp(tmp_path)


# --- failures leave nothing -----------------------------------------------------------------------


def _fail_after(monkeypatch, calls_ok: int, exc: BaseException) -> list[int]:
    count = [0]
    real = writer._write_all

    def flaky(fd: int, data: memoryview) -> None:
        count[0] += 1
        if count[0] > calls_ok:
            raise exc
        real(fd, data)

    monkeypatch.setattr(writer, "_write_all", flaky)
    return count


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_midway(tmp_path, monkeypatch, overwrite) -> None:
    monkeypatch.setenv("FASTCKPT_WRITE_BUFFER_BYTES", "4096")
    old = sd(1)
    if overwrite:
        fastckpt.save(old, tmp_path / "ck")
    count = _fail_after(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError) as info:
        fastckpt.save(sd(2), tmp_path / "ck", overwrite=overwrite, partition_bytes=4096)
    assert count[0] == 4
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename.endswith(".fckpt")  # names the partition being written
    assert_no_temp(tmp_path)
    if overwrite:  # the old checkpoint is untouched and valid
        assert_bitwise_equal(old, read_back(tmp_path / "ck"))
    else:
        assert listing(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_midway(tmp_path, monkeypatch, overwrite) -> None:
    monkeypatch.setenv("FASTCKPT_WRITE_BUFFER_BYTES", "4096")
    old = sd(1)
    if overwrite:
        fastckpt.save(old, tmp_path / "ck")
    seen = [0]

    def interrupt(self: writer.Progress, n: int) -> None:
        seen[0] += n
        if seen[0] > 8192:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fastckpt.save(sd(2), tmp_path / "ck", overwrite=overwrite)
    assert_no_temp(tmp_path)
    if overwrite:
        assert_bitwise_equal(old, read_back(tmp_path / "ck"))
    else:
        assert listing(tmp_path) == []


def test_ctrl_c_during_convert(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    save_file(sd(3), tmp_path / "m.safetensors")
    monkeypatch.setattr(
        writer.Progress, "update", lambda self, n: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        fastckpt.convert(tmp_path / "m.safetensors", tmp_path / "ck")
    assert listing(tmp_path) == ["m.safetensors"]


def test_failure_while_copying_carried_files(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "model"
    src.mkdir()
    save_file(sd(3), src / "model.safetensors")
    (src / "config.json").write_text("{}")

    def broken(a, b, **kw):
        raise OSError(errno.EIO, "Input/output error", b)

    monkeypatch.setattr(writer, "_copy_fd", broken)
    with pytest.raises(OSError, match="Input/output"):
        fastckpt.convert(src, tmp_path / "ck")
    assert listing(tmp_path) == ["model"]


def test_source_changing_underfoot_is_detected(tmp_path) -> None:
    from safetensors.torch import save_file

    from fastckpt.format.sources import open_source

    save_file(sd(3), tmp_path / "m.safetensors")
    source = open_source(tmp_path / "m.safetensors")
    os.truncate(tmp_path / "m.safetensors", 100)
    with source, pytest.raises(FormatError, match="ended while reading"):
        writer.write_checkpoint(tmp_path / "ck", source.tensors)
    assert listing(tmp_path) == ["m.safetensors"]


def test_never_publishes_what_the_reader_refuses(tmp_path, monkeypatch) -> None:
    def corrupt_body(*args, **kwargs):
        body = real(*args, **kwargs)
        body["tensors"][0]["offset"] = 1 << 40  # out of bounds
        return body

    real = writer._index_body
    monkeypatch.setattr(writer, "_index_body", corrupt_body)
    with pytest.raises(FormatError):
        fastckpt.save(sd(1), tmp_path / "ck")
    assert listing(tmp_path) == []


# --- Staging directly -----------------------------------------------------------------------------


def test_staging_names_and_cleanup(tmp_path) -> None:
    with pytest.raises(RuntimeError), atomic.Staging(str(tmp_path / "ck"), overwrite=False) as st:
        assert os.path.basename(st.path).startswith(".ck.tmp-")
        assert os.path.dirname(st.path) == str(tmp_path)
        (tmp_path / os.path.basename(st.path) / spec.INDEX_FILE).write_bytes(b"x")
        raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_staging_publish_twice_refused(tmp_path) -> None:
    with atomic.Staging(str(tmp_path / "ck"), overwrite=False) as st:
        st.publish()
        with pytest.raises(RuntimeError):
            st.publish()
    assert listing(tmp_path) == ["ck"]


def test_staging_rejects_root() -> None:
    with pytest.raises(ValueError, match="no directory name"):
        atomic.Staging("/", overwrite=True)
