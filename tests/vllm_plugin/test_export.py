"""Per-rank exports (``integrations.vllm.export``) without vLLM: a rank's state saved, published
with its manifest and carried files, filled straight into the parameters' memory, and every
mismatch refused with a message that says what differs and how to export again."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastckpt
from fastckpt.integrations.vllm import export
from fastckpt.integrations.vllm.options import VllmLoadOptions
from fastckpt.integrations.vllm.weights import CheckpointMismatchError

TARGET = export.Target(
    architecture="LlamaForCausalLM",
    tensor_parallel_size=2,
    pipeline_parallel_size=1,
    dtype="bfloat16",
    quantization=None,
    quantization_config=None,
    vllm="0.32.0",
)


def _state(rank: int, *, zero: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)

    def r(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=g).to(torch.bfloat16)
        return torch.zeros_like(t) if zero else t

    emb = r(300, 16)
    return {
        "model.embed_tokens.weight": emb,
        "model.layers.0.qkv_proj.weight": r(24, 16),
        "model.layers.0.o_proj.weight": r(16, 8),
        "model.norm.weight": r(16),
        "lm_head.weight": emb,  # tied: one tensor under two names
        "flag": torch.tensor([True, False, True]) if not zero else torch.zeros(3, dtype=torch.bool),
    }


def _stock(tmp_path: Path) -> Path:
    """The model folder an export is made from: config and tokenizer files beside the weights."""
    from safetensors.torch import save_file

    src = tmp_path / "model"
    src.mkdir()
    save_file({"w": torch.zeros(2)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "tokenizer.json").write_text("{}")
    return src


def _export(tmp_path: Path, target: export.Target = TARGET) -> Path:
    src = _stock(tmp_path)
    out = tmp_path / "export"
    stage = tmp_path / "stage"
    ranks = []
    for rank in range(target.tensor_parallel_size):
        export.snapshot(_state(rank), str(stage), target, rank, 0)
        ranks.append(export.rank_dir(target, rank, 0))
    export.publish(str(stage), str(src), ranks, target, carried_from=str(src))
    os.rename(stage, out)
    return out


def _fill(path: Path, state: dict[str, torch.Tensor], running: export.Target, rank: int) -> None:
    with fastckpt.Loader() as loader:
        stats = export.fill(
            state,
            str(path),
            running,
            rank,
            0,
            options=VllmLoadOptions(),
            device="cpu",
            loader=loader,
        )
    assert stats.read_nbytes == sum(
        t.numel() * t.element_size() for n, t in state.items() if n != "lm_head.weight"
    )


def test_export_round_trip_fills_the_parameters_own_memory(tmp_path: Path) -> None:
    out = _export(tmp_path)
    assert (out / "config.json").read_text() == json.dumps({"architectures": ["LlamaForCausalLM"]})
    assert (out / "tokenizer.json").exists()
    manifest = export.read_manifest(str(out))
    assert manifest is not None and manifest["made_for"]["tensor_parallel_size"] == 2
    assert export.is_export(str(out)) and not export.is_export(str(tmp_path / "model"))
    for rank in range(2):
        state = _state(rank, zero=True)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        ptrs = {n: t.data_ptr() for n, t in state.items()}
        _fill(out, state, TARGET, rank)
        want = _state(rank)
        for name, t in state.items():
            assert t.data_ptr() == ptrs[name], name  # filled in place: no new tensor
            assert torch.equal(t, want[name]), name


def test_a_strided_parameter_is_filled_too(tmp_path: Path) -> None:
    out = _export(tmp_path)
    state = _state(0, zero=True)
    base = torch.zeros(16, 32, dtype=torch.bfloat16)
    state["model.layers.0.o_proj.weight"] = base[:, :8]  # a view with gaps, as some layers hold
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with fastckpt.Loader() as loader:
        export.fill(
            state, str(out), TARGET, 0, 0, options=VllmLoadOptions(), device="cpu", loader=loader
        )
    assert torch.equal(
        state["model.layers.0.o_proj.weight"], _state(0)["model.layers.0.o_proj.weight"]
    )
    assert torch.count_nonzero(base[:, 8:]) == 0


def test_fill_to_a_device_through_the_copy_stage(tmp_path: Path) -> None:
    from fastckpt.loader.devstage import fake_stage_factory

    out = _export(tmp_path)
    factory = fake_stage_factory(slot_bytes=4096, slots=2, min_slots=2, delay_s=0.0005)
    state = _state(1, zero=True)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with fastckpt.Loader(device_stage=factory, ring_slot_bytes=4096) as loader:
        st = export.fill(
            state, str(out), TARGET, 1, 0, options=VllmLoadOptions(), device="cuda:0", loader=loader
        )
    assert factory.backend.violations == 0
    assert st.copies > 1
    for name, t in _state(1).items():
        assert torch.equal(state[name], t), name


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"tensor_parallel_size": 4},
            ["tensor-parallel size 2 (this engine: 4)", "--tensor-parallel-size 4"],
        ),
        ({"dtype": "float16"}, ["dtype bfloat16 (this engine: float16)", "--dtype float16"]),
        (
            {"quantization": "fp8"},
            ["quantization none (this engine: fp8)", "--quantization fp8"],
        ),
        ({"vllm": "0.33.1"}, ["vLLM release 0.32.0 (this engine: 0.33.1)", "with vLLM 0.33.1"]),
        ({"architecture": "Qwen2ForCausalLM"}, ["architecture LlamaForCausalLM"]),
    ],
)
def test_an_export_for_another_engine_is_refused_saying_what_differs(
    tmp_path: Path, change: dict[str, object], words: list[str]
) -> None:
    out = _export(tmp_path)
    running = replace(TARGET, **change)  # type: ignore[arg-type]
    state = _state(0, zero=True)
    with pytest.raises(CheckpointMismatchError) as err:
        _fill(out, state, running, 0)
    msg = str(err.value)
    for word in [
        *words,
        "is not loaded",
        "Export again",
        "fastckpt vllm-export",
        str(tmp_path / "model"),
    ]:
        assert word in msg, (word, msg)
    assert all(torch.count_nonzero(t) == 0 for t in state.values())  # nothing was written


def test_a_model_that_differs_from_the_export_is_refused(tmp_path: Path) -> None:
    out = _export(tmp_path)
    state = _state(0, zero=True)
    state["model.layers.0.o_proj.weight"] = torch.zeros(16, 4, dtype=torch.bfloat16)
    state["extra.bias"] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(CheckpointMismatchError) as err:
        _fill(out, state, TARGET, 0)
    msg = str(err.value)
    assert "model.layers.0.o_proj.weight: export [16, 8] bfloat16, model [16, 4] bfloat16" in msg
    assert "extra.bias is not in the export" in msg
    assert "fastckpt vllm-export" in msg


def test_a_missing_rank_and_a_foreign_rank_checkpoint_are_refused(tmp_path: Path) -> None:
    out = _export(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="no checkpoint for rank tp=2"):
        _fill(out, _state(0, zero=True), TARGET, 2)
    # rank 1's folder swapped for rank 0's: its index records another rank
    r0, r1 = (out / export.rank_dir(TARGET, r, 0) for r in (0, 1))
    os.rename(r1, tmp_path / "aside")
    os.rename(r0, r1)
    with pytest.raises(CheckpointMismatchError, match="does not record the export it belongs to"):
        _fill(out, _state(1, zero=True), TARGET, 1)


@pytest.mark.parametrize(
    "manifest",
    [
        "not json",
        json.dumps({"format": "other"}),
        json.dumps({"format": export.FORMAT, "version": 99}),
        json.dumps({"format": export.FORMAT, "version": 1, "made_for": {"x": 1}}),
    ],
)
def test_a_bad_manifest_is_refused(tmp_path: Path, manifest: str) -> None:
    out = _export(tmp_path)
    (out / export.MANIFEST).write_text(manifest)
    with pytest.raises(CheckpointMismatchError, match="not a valid fastckpt vLLM export manifest"):
        export.read_manifest(str(out))


def test_publish_refuses_a_rank_written_for_another_target(tmp_path: Path) -> None:
    src = _stock(tmp_path)
    stage = tmp_path / "stage"
    export.snapshot(_state(0), str(stage), TARGET, 0, 0)
    with pytest.raises(RuntimeError, match="was not written for"):
        export.publish(
            str(stage),
            str(src),
            [export.rank_dir(TARGET, 0, 0)],
            replace(TARGET, dtype="float16"),
            carried_from=str(src),
        )
    assert not (stage / export.MANIFEST).exists()


def test_a_parameter_without_data_cannot_be_exported(tmp_path: Path) -> None:
    state = {"w": torch.empty(4, device="meta"), "b": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="w hold no data"):
        export.snapshot(state, str(tmp_path / "x"), TARGET, 0, 0)
