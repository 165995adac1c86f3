"""The carried-file rule, shared by conversion sources and stock safetensors folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastckpt.format import spec
from fastckpt.format.fsdir import CheckpointDir
from fastckpt.format.safetensors import carried_files as safetensors_carried
from fastckpt.format.sources import open_source
from fastckpt.rules.carried import INDEX_FILE, is_carried_name, is_weight_file


def test_index_file_name_matches_the_spec() -> None:
    assert INDEX_FILE == spec.INDEX_FILE


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "MODEL.SAFETENSORS",
        "x.pt",
        "x.pth",
        "x.ckpt",
        "part-00000.fckpt",
        "x.gguf",
        "tf_model.h5",
        "flax_model.msgpack",
        "model.onnx",
        "rust_model.ot",
        "m.tflite",
        "a.pkl",
        "a.pickle",
        "a.npz",
        "a.npy",
        "fastckpt.index",
    ],
)
def test_weight_files_are_not_carried(name: str) -> None:
    assert is_weight_file(name)
    assert not is_carried_name(name)


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "README.md", "vocab.txt", "tokenizer.index.json"]
)
def test_other_files_are_carried(name: str) -> None:
    assert not is_weight_file(name)
    assert is_carried_name(name)


def test_hidden_files_are_not_carried() -> None:
    assert not is_carried_name(".gitattributes")
    assert not is_carried_name("")


def test_both_call_sites_carry_the_same_files(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", ".hidden", "extra.npy", "x.pickle"):
        (tmp_path / name).write_text("{}")
    os.mkdir(tmp_path / "sub")
    expected = ["config.json", "tokenizer.json"]
    with CheckpointDir(str(tmp_path)) as d:
        assert list(safetensors_carried(d)) == expected
    with open_source(tmp_path) as source:
        assert [name for name, _ in source.files] == expected
