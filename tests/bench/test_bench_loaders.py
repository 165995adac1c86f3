"""The loaders and the worker's measurement pieces, run in-process on a tiny checkpoint."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fastckpt.bench import loaders, worker
from fastckpt.bench.generate import CheckpointSet
from fastckpt.bench.runner import compare_fingerprints


def test_resolve_names() -> None:
    assert loaders.resolve_names("all") == list(loaders.LOADERS)
    assert loaders.resolve_names("Runai-Model-Streamer, safetensors,runai") == [
        "runai",
        "safetensors",
    ]
    with pytest.raises(ValueError, match="unknown loader 'nope'"):
        loaders.resolve_names("safetensors,nope")
    with pytest.raises(ValueError, match="no loader"):
        loaders.resolve_names(" , ")


def test_availability_reports_reasons() -> None:
    assert loaders.availability("safetensors", cuda=False)["available"] is True
    it = loaders.availability("instanttensor", cuda=False)
    assert it == {"available": False, "reason": "needs a CUDA device", "version": None}


def _reference(ckpt: CheckpointSet) -> dict[str, list[Any]]:
    loaded = loaders.load("safetensors", ckpt.to_json(), "cpu")
    algo, fp = worker.fingerprint(loaded.tensors)
    assert algo in ("crc32c", "crc32")
    return fp


@pytest.mark.parametrize("name", ["torch-mmap", "fastckpt", "fastckpt-st"])
def test_loader_matches_reference(name: str, tiny_ckpt: CheckpointSet) -> None:
    avail = loaders.availability(name, cuda=False)
    if not avail["available"]:
        pytest.skip(avail["reason"])
    if name == "fastckpt" and tiny_ckpt.fastckpt_dir is None:
        pytest.skip("no fastckpt conversion")
    loaded = loaders.load(name, tiny_ckpt.to_json(), "cpu")
    try:
        assert worker.touch_pages(loaded.tensors) > 0
        _, fp = worker.fingerprint(loaded.tensors)
    finally:
        loaded.release()
    assert compare_fingerprints(fp, _reference(tiny_ckpt)) == ""
    assert loaded.tensors == {}


def test_fingerprint_sees_one_flipped_byte(tiny_ckpt: CheckpointSet) -> None:
    ref = _reference(tiny_ckpt)
    tensors = loaders.load("safetensors", tiny_ckpt.to_json(), "cpu").tensors
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(torch.uint8).view(-1)[7] ^= 1
    _, fp = worker.fingerprint(tensors)
    diff = compare_fingerprints(fp, ref)
    assert diff.startswith("1 differ") and name in diff


def test_compare_fingerprints_names_problems() -> None:
    ref = {"a": ["bfloat16", [2], 4, 1], "b": ["bfloat16", [2], 4, 2]}
    assert compare_fingerprints(dict(ref), ref) == ""
    assert "1 missing (e.g. b)" in compare_fingerprints({"a": ref["a"]}, ref)
    assert "1 unexpected (e.g. c)" in compare_fingerprints({**ref, "c": ref["a"]}, ref)
    wrong_dtype = {"a": ["float16", [2], 4, 1], "b": ref["b"]}
    assert "1 differ (e.g. a" in compare_fingerprints(wrong_dtype, ref)


def test_touch_pages_reads_every_page() -> None:
    # one non-zero byte per 4 KiB page, at varying offsets: the strided sum must see each one
    t = torch.zeros(10 * 4096 + 100, dtype=torch.uint8)
    t[::4096] = 1
    assert worker.touch_pages({"t": t}) == 11 + int(t[-1])
    empty = torch.empty(0, dtype=torch.bfloat16)
    scalar = torch.tensor(3, dtype=torch.int16)
    assert worker.touch_pages({"e": empty, "s": scalar}) == 3  # first byte 3, last byte 0


def test_fingerprint_handles_odd_tensors() -> None:
    tensors = {
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3, dtype=torch.float32),
        "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        "bool": torch.tensor([True, False]),
    }
    _, fp = worker.fingerprint(tensors)
    assert fp["empty"] == ["float32", [0, 3], 0, 0]
    assert fp["scalar"][:3] == ["bfloat16", [], 2]
    assert fp["strided"][:3] == ["int32", [4, 3], 48]
    again = worker.fingerprint({"strided": tensors["strided"].contiguous()})[1]
    assert again["strided"] == fp["strided"]


def test_load_refuses_missing_forms(tiny_ckpt: CheckpointSet) -> None:
    data = dict(tiny_ckpt.to_json(), torch_file=None, fastckpt_dir=None)
    with pytest.raises(ValueError, match=r"no torch \.bin"):
        loaders.load("torch-mmap", data, "cpu")
    with pytest.raises(ValueError, match="no fastckpt conversion"):
        loaders.load("fastckpt", data, "cpu")
