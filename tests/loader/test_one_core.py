"""Every way bytes leave a checkpoint goes through the one load core, so FORMAT.md's rules hold
for each entry point: ``load``, ``open``/``get_tensor``/``get_slice``, ``iter_tensors``, the cache
daemon's copies and the vLLM weight source. Each is checked here on the same bad inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import bits

import fastckpt
from fastckpt.errors import CorruptDataError, FormatError
from fastckpt.integrations.vllm.options import parse_options
from fastckpt.integrations.vllm.weights import iter_weights


def _ckpt(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    sd = {
        "a.w": torch.randn(4000, generator=g),
        "mask": torch.tensor([True, False, True, True] * 64),
        "b.w": torch.randn(3000, generator=g),
    }
    path = root / "ck"
    fastckpt.save(sd, path, partition_bytes=1 << 20, metadata=None)
    return path, sd


def _poison_bool(path: Path) -> None:
    """Write the byte 2 into the stored bool tensor (checksums made to match, so only the bool
    rule can catch it)."""
    index = fastckpt.read_index(path)
    entry = index.tensors["mask"]
    part = index.partitions[entry.partition].path
    with open(part, "r+b") as f:
        f.seek(entry.offset + 1)
        f.write(b"\x02")


def _load(path: Path) -> Any:
    return fastckpt.load(path)


def _open_get(path: Path) -> Any:
    with fastckpt.open(path) as f:
        return f.get_tensor("mask")


def _open_slice(path: Path) -> Any:
    with fastckpt.open(path) as f:
        return f.get_slice("mask")[0:8]


def _iter(path: Path) -> Any:
    return dict(fastckpt.iter_tensors(path, window_bytes=4096))


def _vllm(path: Path) -> Any:
    return dict(iter_weights(path, parse_options(None)))


ENTRY_POINTS: dict[str, Callable[[Path], Any]] = {
    "load": _load,
    "open.get_tensor": _open_get,
    "open.get_slice": _open_slice,
    "iter_tensors": _iter,
    "vllm.iter_weights": _vllm,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_refuses_bool_bytes_other_than_0_and_1(
    tmp_path: Path, entry: str
) -> None:
    path, _ = _ckpt(tmp_path)
    _poison_bool(path)
    with pytest.raises(CorruptDataError, match="bool"):
        ENTRY_POINTS[entry](path)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_refuses_a_partition_that_links_out(tmp_path: Path, entry: str) -> None:
    path, _ = _ckpt(tmp_path)
    index = fastckpt.read_index(path)
    part = Path(index.partitions[0].path)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(part.read_bytes())
    part.unlink()
    part.symlink_to(outside)
    with pytest.raises(FormatError, match=r"link|outside|beneath"):
        ENTRY_POINTS[entry](path)


@pytest.mark.parametrize("entry", ["open.get_tensor", "open.get_slice", "iter_tensors"])
def test_files_swapped_after_opening_are_never_read(tmp_path: Path, entry: str) -> None:
    """``open`` and ``iter_tensors`` read through the descriptors they validated: a partition
    replaced afterwards (by a link out of the folder, with other bytes) is not read."""
    path, sd = _ckpt(tmp_path)
    index = fastckpt.read_index(path)
    part = Path(index.partitions[0].path)
    forged = tmp_path / "forged.bin"
    forged.write_bytes(b"\x01" * part.stat().st_size)
    if entry.startswith("open"):
        with fastckpt.open(path) as f:
            part.unlink()
            part.symlink_to(forged)
            got = f.get_tensor("a.w") if entry == "open.get_tensor" else f.get_slice("a.w")[:]
        assert torch.equal(bits(got), bits(sd["a.w"]))
    else:
        it = fastckpt.iter_tensors(path, window_bytes=4096)
        part.unlink()
        part.symlink_to(forged)
        got = dict(it)
        assert all(torch.equal(bits(got[k]), bits(sd[k])) for k in sd)


def _next_generation() -> dict[str, torch.Tensor]:
    """Another generation of ``_ckpt``'s checkpoint: other sizes, another order, other bytes, so
    the first generation's offsets land inside other tensors of this one."""
    g = torch.Generator().manual_seed(6)
    return {
        "b.w": torch.randn(9000, generator=g),
        "mask": torch.tensor([False, True] * 200),
        "a.w": torch.randn(7000, generator=g),
    }


@pytest.mark.parametrize("entry", ["open.get_tensor", "open.get_slice", "iter_tensors"])
def test_a_republish_after_opening_is_never_read(tmp_path: Path, entry: str) -> None:
    """The checkpoint is republished (atomically, another layout) after ``open`` or
    ``iter_tensors`` validated it: what they return is the generation they validated, never
    bytes of the new one at the old offsets."""
    path, sd = _ckpt(tmp_path)
    new = _next_generation()
    if entry.startswith("open"):
        with fastckpt.open(path) as f:
            fastckpt.save(new, path, partition_bytes=1 << 20, metadata=None, overwrite=True)
            got = {
                k: f.get_tensor(k) if entry == "open.get_tensor" else f.get_slice(k)[:] for k in sd
            }
    else:
        it = fastckpt.iter_tensors(path, window_bytes=4096)
        fastckpt.save(new, path, partition_bytes=1 << 20, metadata=None, overwrite=True)
        got = dict(it)
    assert all(torch.equal(bits(got[k]), bits(sd[k])) for k in sd)
    assert fastckpt.load(path)["a.w"].numel() == 7000  # the new generation is there for others


def test_a_forked_child_loads(tmp_path: Path) -> None:
    """Engines, rings and pools made in the parent are reset in a child: its loads work (the
    engine's threads do not exist there)."""
    path, sd = _ckpt(tmp_path)
    fastckpt.load(path, private_copy=True)  # the default Loader now has an engine
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            got = fastckpt.load(path, private_copy=True)
            ok = all(torch.equal(bits(got[k]), bits(sd[k])) for k in sd)
            streamed = dict(fastckpt.iter_tensors(path))
            ok = ok and all(torch.equal(bits(streamed[k]), bits(sd[k])) for k in sd)
            code = 0 if ok else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    status = os.read(r, 1)
    os.close(r)
    _, wait = os.waitpid(pid, 0)
    assert status == b"\x00" and os.waitstatus_to_exitcode(wait) == 0


def test_a_closed_loader_refuses_use(tmp_path: Path) -> None:
    path, _ = _ckpt(tmp_path)
    loader = fastckpt.Loader()
    loader.close()
    loader.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        loader.load(path)
    with pytest.raises(RuntimeError, match="closed"):
        fastckpt.open(path, loader=loader)
    with pytest.raises(RuntimeError, match="closed"):
        fastckpt.iter_tensors(path, loader=loader)


def _stock(root: Path, mask: bytes) -> Path:
    """A stock safetensors folder (one shard, a config.json beside it) holding a bool tensor
    with the given bytes."""
    from safetensors.torch import save_file

    folder = root / "stock"
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    t = {"w": torch.randn(5000, generator=g), "mask": torch.zeros(len(mask), dtype=torch.bool)}
    save_file(t, str(folder / "model.safetensors"))
    entry = fastckpt.read_index(folder).tensors["mask"]
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(entry.offset)
        f.write(mask)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_the_ssd_tiers_conversion_reads_through_the_core(tmp_path: Path) -> None:
    folder = _stock(tmp_path, bytes([1, 0, 1, 1]))
    with fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=str(tmp_path / "ssd")) as loader:
        got, st = loader.load(folder, stats=True)
        assert st.kind == "safetensors"  # the source; converted after the load
        assert got["mask"].tolist() == [True, False, True, True]
        assert loader.conversions.wait(60)
        got, st = loader.load(folder, stats=True)
        assert st.kind == "fastckpt"  # served from the converted copy
        copy = Path(st.path)
        assert (copy / "config.json").read_text() == '{"model_type": "llama"}'
        assert got["mask"].tolist() == [True, False, True, True]
    bad = (
        _stock(tmp_path / "bad", bytes([1, 0, 2, 1]))
        if (tmp_path / "bad").mkdir() is None
        else None
    )
    assert bad is not None
    ssd2 = str(tmp_path / "ssd2")
    for mode in ("background", "inline"):
        with (
            fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=ssd2, ssd_convert=mode) as ld,
            pytest.raises(CorruptDataError, match="bool"),
        ):
            ld.load(bad)  # background: the source's read; inline: the conversion's
    with fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=ssd2) as loader:
        with pytest.raises(CorruptDataError, match="bool"):  # the conversion reads the core
            loader.prefetch(bad, tier="ssd").result(timeout=60)
        assert loader.cache_info()["ssd"]["conversions"]["scheduled"] == 0  # after no failure
    assert not any((tmp_path / "ssd2").glob("[0-9a-f]*"))  # nothing kept from the bad source
