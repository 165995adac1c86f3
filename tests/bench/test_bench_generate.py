from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastckpt.bench import generate
from fastckpt.bench.generate import (
    CheckpointSet,
    LlamaShape,
    auto_shard_bytes,
    choose_shape,
    existing_checkpoint,
    generate_checkpoint,
    plan_shards,
)


def test_anchor_shape_matches_benchmarks_md() -> None:
    # the project's benchmark brief: LLaMA-like, bf16, 165 tensors, 7.81 GB.
    shape = choose_shape(7_810_000_000)
    assert (shape.hidden, shape.intermediate, shape.vocab, shape.layers) == (4096, 11008, 32000, 18)
    assert len(shape.tensor_specs()) == 165
    assert abs(shape.nbytes - 7_810_000_000) / 7_810_000_000 < 0.01


@pytest.mark.parametrize("target", [1_000_000, 8_000_000, 100_000_000, 2_000_000_000, 6e9])
def test_choose_shape_is_close_and_llama_like(target: float) -> None:
    shape = choose_shape(int(target))
    assert abs(shape.nbytes - target) / target < 0.15
    names = [n for n, _ in shape.tensor_specs()]
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert len(names) == 9 * shape.layers + 3 == len(set(names))
    assert shape.intermediate > 2 * shape.hidden


def test_choose_shape_rejects_tiny() -> None:
    with pytest.raises(ValueError, match="too small"):
        choose_shape(999_999)


def test_plan_shards_keeps_order_and_cap() -> None:
    specs = LlamaShape(64, 172, 256, 5).tensor_specs()
    cap = 60_000
    shards = plan_shards(specs, cap)
    assert [s for shard in shards for s in shard] == specs
    assert len(shards) > 2
    for shard in shards:
        total = sum(2 * int(torch.tensor(shape).prod()) for _, shape in shard)
        assert total <= cap or len(shard) == 1


def test_auto_shard_bytes_gives_two_shards() -> None:
    for total in (1_200_000, 2_000_000_000, 7_810_000_000):
        shape = choose_shape(total)
        assert len(plan_shards(shape.tensor_specs(), auto_shard_bytes(shape.nbytes))) == 2


def test_generated_checkpoint_is_complete(tiny_ckpt: CheckpointSet) -> None:
    shape = LlamaShape(**tiny_ckpt.description)
    specs = dict(shape.tensor_specs())
    root = Path(tiny_ckpt.safetensors_path)
    index = json.loads((root / generate.ST_INDEX).read_text())
    assert set(index["weight_map"]) == set(specs)
    assert index["metadata"]["total_size"] == tiny_ckpt.nbytes == shape.nbytes
    assert sorted(set(index["weight_map"].values())) == [
        os.path.basename(f) for f in tiny_ckpt.safetensors_files
    ]
    assert len(tiny_ckpt.safetensors_files) >= 3  # shard_bytes=400_000
    config = json.loads((root / "config.json").read_text())
    assert config["hidden_size"] == shape.hidden
    loaded: dict[str, torch.Tensor] = {}
    for f in tiny_ckpt.safetensors_files:
        loaded.update(load_file(f))
    assert {k: tuple(v.shape) for k, v in loaded.items()} == specs
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    assert all(bool((v != 0).any()) for v in loaded.values())  # random, never zeros
    assert tiny_ckpt.torch_file is not None
    via_torch = torch.load(tiny_ckpt.torch_file, weights_only=True)
    assert set(via_torch) == set(loaded)
    for k, v in loaded.items():
        assert torch.equal(via_torch[k].view(torch.uint8), v.view(torch.uint8)), k


def test_generation_is_deterministic_and_reused(tmp_path: Path) -> None:
    a, _ = generate_checkpoint(str(tmp_path / "a"), 1_000_000, seed=5, with_fastckpt=False)
    b, _ = generate_checkpoint(str(tmp_path / "b"), 1_000_000, seed=5, with_fastckpt=False)
    for fa, fb in zip(a.safetensors_files, b.safetensors_files, strict=True):
        assert Path(fa).read_bytes() == Path(fb).read_bytes()
    mtime = os.stat(a.safetensors_files[0]).st_mtime_ns
    again, _ = generate_checkpoint(str(tmp_path / "a"), 1_000_000, seed=5, with_fastckpt=False)
    assert again.safetensors_files == a.safetensors_files
    assert os.stat(a.safetensors_files[0]).st_mtime_ns == mtime  # reused, not rewritten
    assert again.owned == ()  # a reused checkpoint is not removed at the end of the run
    other, _ = generate_checkpoint(str(tmp_path / "a"), 1_000_000, seed=6, with_fastckpt=False)
    assert Path(other.safetensors_files[0]).read_bytes() != Path(fb).read_bytes()


def test_damaged_manifest_files_force_regeneration(tmp_path: Path) -> None:
    a, _ = generate_checkpoint(str(tmp_path), 1_000_000, with_fastckpt=False)
    with open(a.safetensors_files[0], "ab") as fh:
        fh.write(b"x")
    b, _ = generate_checkpoint(str(tmp_path), 1_000_000, with_fastckpt=False)
    assert b.owned == (b.root,)
    load_file(b.safetensors_files[0])  # a valid file again


def test_existing_stock_checkpoint(tiny_ckpt: CheckpointSet, tmp_path: Path) -> None:
    ckpt, _ = existing_checkpoint(tiny_ckpt.safetensors_path, str(tmp_path), with_fastckpt=False)
    assert ckpt.safetensors_files == tiny_ckpt.safetensors_files
    assert ckpt.nbytes == tiny_ckpt.nbytes
    assert ckpt.tensors == tiny_ckpt.tensors
    assert ckpt.torch_file is not None and os.path.isfile(ckpt.torch_file)
    assert all(p.startswith(str(tmp_path)) for p in ckpt.owned)
    one, _ = existing_checkpoint(
        tiny_ckpt.safetensors_files[0], str(tmp_path), with_torch_bin=False, with_fastckpt=False
    )
    assert one.safetensors_files == (tiny_ckpt.safetensors_files[0],)
    assert 0 < one.nbytes < tiny_ckpt.nbytes


def test_existing_checkpoint_errors(tmp_path: Path, tiny_ckpt: CheckpointSet) -> None:
    with pytest.raises(FileNotFoundError):
        existing_checkpoint(str(tmp_path / "missing"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.safetensors"):
        existing_checkpoint(str(tmp_path / "empty"), str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="safetensors file"):
        existing_checkpoint(str(tmp_path / "x.bin"), str(tmp_path))
    if tiny_ckpt.fastckpt_dir is not None:
        with pytest.raises(ValueError, match="fastckpt checkpoint"):
            existing_checkpoint(tiny_ckpt.fastckpt_dir, str(tmp_path))


def test_fastckpt_form_when_converter_exists(tiny_ckpt: CheckpointSet) -> None:
    import fastckpt

    try:
        fastckpt.convert  # noqa: B018
    except (ImportError, AttributeError):
        pytest.skip("fastckpt.convert is not available yet")
    assert tiny_ckpt.fastckpt_dir is not None
    assert "fastckpt.index" in [os.path.basename(f) for f in tiny_ckpt.fastckpt_files()]
