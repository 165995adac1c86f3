"""Issue #8 items 4-10: one rule in one place, correct bytes from every source, clear errors."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastckpt
from fastckpt.errors import (
    CorruptDataError,
    DtypeError,
    InvalidNameError,
    LimitError,
    SourceError,
)
from fastckpt.format import atomic


def _raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(offsets: tuple[int, int], shape: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape or [1], "data_offsets": list(offsets)}


# --- item 4: deflated zip records --------------------------------------------------------------


def rezip_deflated(src: Path, dst: Path) -> None:
    """Rewrite a torch zip archive with every record DEFLATE-compressed (torch.load reads it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)


def test_deflated_torch_zip_converts_to_the_right_bytes(tmp_path: Path) -> None:
    sd = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "stored.bin")
    rezip_deflated(tmp_path / "stored.bin", tmp_path / "deflated.bin")
    ref = torch.load(tmp_path / "deflated.bin", weights_only=True)
    fastckpt.convert(tmp_path / "deflated.bin", tmp_path / "ck")
    out = fastckpt.load(tmp_path / "ck")
    for name, t in ref.items():
        assert torch.equal(out[name], t)


# --- item 5: limits at validation -----------------------------------------------------------------


def test_stride_overflow_is_refused_everywhere(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "x.safetensors", {"t": _f32((0, 0), [0, 2**62, 2**62])}, b"")
    with pytest.raises(LimitError):
        fastckpt.read_index(path)
    with pytest.raises(LimitError):
        fastckpt.convert(path, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# --- item 6: one name rule, one bool rule ---------------------------------------------------------


@pytest.mark.parametrize("name", ["", "\ud800"])
def test_bad_names_refused_by_reader_loader_and_converter(tmp_path: Path, name: str) -> None:
    header = json.dumps({name: _f32((0, 4))}).encode()  # "\ud800" stays a JSON escape
    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 4)
    for call in (fastckpt.read_index, fastckpt.load):
        with pytest.raises(InvalidNameError):
            call(path)
    with pytest.raises(InvalidNameError):
        fastckpt.convert(path, tmp_path / "ck")
    with pytest.raises(InvalidNameError):
        fastckpt.save({name: torch.ones(1)}, tmp_path / "ck2")


def test_bool_bytes_other_than_0_1_refused(tmp_path: Path) -> None:
    bad = {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    path = _raw_safetensors(tmp_path / "x.safetensors", bad, b"\x01\x02\x00")
    with pytest.raises(CorruptDataError):
        fastckpt.load(path)
    with pytest.raises(CorruptDataError):
        fastckpt.convert(path, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    weird = torch.tensor([1, 2, 0], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(CorruptDataError):
        fastckpt.save({"m": weird}, tmp_path / "ck2")
    fastckpt.save({"m": torch.tensor([True, False])}, tmp_path / "ok")
    assert fastckpt.load(tmp_path / "ok")["m"].tolist() == [True, False]


# --- item 7: parity with the safetensors library's own validation --------------------------------

_DATA4 = b"\0" * 4
PARITY_CASES: dict[str, tuple[Any, bytes]] = {
    "valid": ({"a": _f32((0, 4))}, _DATA4),
    "gap between tensors": ({"a": _f32((0, 4)), "b": _f32((8, 12))}, b"\0" * 12),
    "first tensor not at 0": ({"a": _f32((4, 8))}, b"\0" * 8),
    "trailing bytes": ({"a": _f32((0, 4))}, b"\0" * 8),
    "overlap": ({"a": _f32((0, 4)), "b": _f32((2, 6))}, b"\0" * 6),
    "whitespace before {": (b'  {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', _DATA4),
    "trailing whitespace": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}  ', _DATA4),
    "65 dimensions": ({"a": _f32((0, 4), [1] * 65)}, _DATA4),
    "empty tensor first": (
        {"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": _f32((0, 4))},
        _DATA4,
    ),
    "unknown dtype": ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, _DATA4),
    "F6 dtype": ({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3),
    "F4 dtype": ({"a": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}}, _DATA4),
    "wrong size": ({"a": _f32((0, 4), [2])}, _DATA4),
    "metadata not strings": (
        b'{"__metadata__":{"x":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        _DATA4,
    ),
    "float dimension": (b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', _DATA4),
    "end before begin": ({"a": _f32((4, 0))}, _DATA4),
    "not an object": (b"[1, 2]", b""),
    "header past the end": (b"{}", b""),
    "extra entry keys": (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"zzz":1}}',
        _DATA4,
    ),
    # Deliberate differences (FORMAT.md section 7.1): safetensors accepts these.
    "duplicate key": (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        _DATA4,
    ),
    "empty name": ({"": _f32((0, 4))}, _DATA4),
    "stride overflow": ({"a": _f32((0, 0), [0, 2**62, 2**62])}, b""),
}
DELIBERATE = {"duplicate key", "empty name", "stride overflow"}


def _reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                f.get_tensor(k)
    except Exception:
        return False
    return True


def _fastckpt_accepts(path: Path) -> bool:
    try:
        fastckpt.load(path)
    except fastckpt.FormatError:
        return False
    return True


@pytest.mark.parametrize("suffix", [".safetensors", ""])
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_safetensors(tmp_path: Path, case: str, suffix: str) -> None:
    header, data = PARITY_CASES[case]
    if case == "header past the end":
        path = tmp_path / f"x{suffix}"
        path.write_bytes(struct.pack("<Q", 100) + b"{}")
    else:
        path = _raw_safetensors(tmp_path / f"x{suffix}", header, data)
    reference = _reference_accepts(path)
    ours = _fastckpt_accepts(path)
    if case in DELIBERATE:
        assert reference and not ours, "a listed deliberate difference must still be one"
    else:
        assert ours == reference, f"safetensors {'accepts' if reference else 'refuses'} it"


# --- item 8: newer dtypes -------------------------------------------------------------------------


def test_f4_loads_and_converts_like_safetensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}}
    path = _raw_safetensors(tmp_path / "x.safetensors", header, bytes([1, 2, 3, 0x7F]))
    with safe_open(str(path), "pt") as f:
        ref = f.get_tensor("a")
    ours = fastckpt.load(path)["a"]
    assert ours.dtype == ref.dtype == torch.float4_e2m1fn_x2
    assert ours.shape == ref.shape
    assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
    fastckpt.convert(path, tmp_path / "ck")
    back = fastckpt.load(tmp_path / "ck")["a"]
    assert torch.equal(back.view(torch.uint8), ref.view(torch.uint8))


def test_f6_is_a_dtype_error_naming_torch(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}
    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 3)
    with pytest.raises(DtypeError, match="torch"):
        fastckpt.load(path)


# --- item 9: private copies -----------------------------------------------------------------------


def test_private_copy_is_not_changed_by_a_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(4096)}, str(path))
    path.read_bytes()  # page-cached: the mapped path would be taken
    monkeypatch.setenv("FASTCKPT_MMAP_MIN_RESIDENT", "0")
    sd, stats = fastckpt.load(path, private_copy=True, stats=True)
    mapped, mstats = fastckpt.load(path, stats=True)
    assert "page-cache-map" not in stats.path_taken
    assert "page-cache-map" in mstats.path_taken
    with open(path, "r+b") as f:  # rewrite the data in place, as another program might
        f.seek(path.stat().st_size - 4)
        f.write(b"\xff" * 4)
    assert float(sd["w"][-1]) == 0.0  # the private copy did not change
    assert float(mapped["w"][-1]) != 0.0  # the documented behaviour of a mapping


# --- item 10: smaller ones -----------------------------------------------------------------------


def test_load_argument_checks(tmp_path: Path) -> None:
    fastckpt.save({"a": torch.ones(1), "b": torch.ones(1), "ab": torch.ones(1)}, tmp_path / "c")
    fastckpt.load(tmp_path / "c")  # warm
    with pytest.raises(ValueError, match="bogus"):
        fastckpt.load(tmp_path / "c", engine="bogus")
    with pytest.raises(TypeError, match="single string"):
        fastckpt.load(tmp_path / "c", names="ab")
    assert list(fastckpt.load(os.fsencode(tmp_path / "c"), names=["ab"])) == ["ab"]
    assert fastckpt.read_index(os.fsencode(tmp_path / "c")).root == str(tmp_path / "c")


def test_refused_pickle_names_what_was_blocked(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"a": torch.ones(1), "f": zipfile.ZipInfo("x")}, path)
    with pytest.raises(SourceError) as exc:
        fastckpt.convert(path, tmp_path / "ck")
    text = str(exc.value)
    assert "zipfile.ZipInfo" in text and "will not unpickle" in text
    assert "weights_only=False will likely succeed" not in text


@pytest.mark.parametrize("resident", [0.0, 1.0])
def test_truncation_after_validation_is_a_truncated_error(tmp_path: Path, resident: float) -> None:
    """The file shrinks between validation and the reads (resident 1.0: the mapped path)."""
    from fastckpt.loader.sources import open_partition

    fastckpt.save({"w": torch.ones(100_000)}, tmp_path / "c")

    def truncate_then_open(index: Any, partition: int, src: Any, *, direct: Any) -> Any:
        os.truncate(index.partitions[partition].path, 4096)
        return open_partition(index, partition, src, direct=direct)

    loader = fastckpt.Loader(
        open_partition=truncate_then_open, residency=lambda p: resident, mmap_min_resident=0.5
    )
    with pytest.raises(fastckpt.TruncatedError):
        loader.load(tmp_path / "c")


_SLOW_CONVERT = textwrap.dedent(
    """
    import sys, time
    from fastckpt import cli
    from fastckpt.format import writer
    def slow(self, n):
        print("writing", flush=True)
        time.sleep(60)
    writer.Progress.update = slow
    sys.exit(cli.main(["convert", sys.argv[1], sys.argv[2], "--no-progress"]))
    """
)


def test_sigterm_during_convert_removes_the_temporary_folder(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1000)}, str(tmp_path / "src.safetensors"))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_CONVERT,
            str(tmp_path / "src.safetensors"),
            str(tmp_path / "ck"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    assert any(n.startswith(".ck.tmp-") for n in os.listdir(tmp_path))
    child.terminate()
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def test_stale_temporary_siblings_are_swept_only_when_their_owner_is_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = atomic._owner_tag()
    host = tag.split("-")[0]
    stale = tmp_path / f".ck.tmp-{host}-{dead.pid}-1-abc"
    alive = tmp_path / f".ck.tmp-{tag}-def"
    other = tmp_path / f".other.tmp-{host}-{dead.pid}-1-abc"
    for d in (stale, alive, other):
        d.mkdir()
        (d / "part-00000.fckpt").write_bytes(b"x")
    fastckpt.save({"w": torch.ones(1)}, tmp_path / "ck")
    assert not stale.exists()
    assert alive.exists() and other.exists()


def test_enospc_while_writing_the_index_names_the_file(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # Empty tensors: partitions take no space, the index (~2 MB of JSON) does not fit.
        sd = {f"layer.{i:05d}.a_rather_long_parameter_name": torch.empty(0) for i in range(20_000)}
        with pytest.raises(OSError) as exc:
            fastckpt.save(sd, mnt / "ck")
        assert exc.value.errno == errno.ENOSPC
        assert exc.value.filename and "fastckpt.index" in str(exc.value.filename)
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_republish_keeps_loading_elsewhere(tmp_path: Path) -> None:
    """A load holds its snapshot even when the directory is replaced right after opening."""
    from fastckpt.format.reader import open_checkpoint

    fastckpt.save({"w": torch.zeros(10)}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as ck:
        fastckpt.save({"w": torch.ones(20)}, tmp_path / "c", overwrite=True)
        time.sleep(0)
        data = os.pread(ck.partitions[0].fd, 40, 0)
    assert data == bytes(40)


# --- issue #9: the converter carries the non-weight tree, confined -------------------------------


def test_convert_carries_sub_folders_confined(tmp_path: Path) -> None:
    src = tmp_path / "st-model"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "2_Dense").mkdir()
    (src / "processor" / "deep").mkdir(parents=True)
    (src / ".git").mkdir()
    save_file({"w": torch.ones(4)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    (src / "2_Dense" / "config.json").write_text('{"dense": 1}')
    (src / "2_Dense" / "model.safetensors").write_bytes(b"weights are not carried")
    (src / "processor" / "deep" / "x.txt").write_text("deep")
    (src / ".git" / "HEAD").write_text("hidden")
    (tmp_path / "secret.txt").write_text("password")
    os.symlink("../../secret.txt", src / "processor" / "leak.txt")
    with pytest.raises(fastckpt.UnsafePathError):
        fastckpt.convert(src, tmp_path / "ck")
    (src / "processor" / "leak.txt").unlink()
    index = fastckpt.convert(src, tmp_path / "ck")
    assert index.tree == ("1_Pooling/config.json", "2_Dense/config.json", "processor/deep/x.txt")
    assert index.version == (1, 1)
    assert (tmp_path / "ck" / "1_Pooling" / "config.json").read_text() == '{"pooling": "mean"}'
    assert not (tmp_path / "ck" / ".git").exists()
    assert not (tmp_path / "ck" / "2_Dense" / "model.safetensors").exists()
    # re-converting a fastckpt checkpoint keeps its tree; a tree file outside is refused
    again = fastckpt.convert(tmp_path / "ck", tmp_path / "ck2")
    assert again.tree == index.tree
    os.unlink(tmp_path / "ck2" / "processor" / "deep" / "x.txt")
    os.symlink("../../../secret.txt", tmp_path / "ck2" / "processor" / "deep" / "x.txt")
    with pytest.raises(fastckpt.UnsafePathError):
        fastckpt.read_index(tmp_path / "ck2")
