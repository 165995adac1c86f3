"""load_model and the from_pretrained drop-in against transformers' own from_pretrained."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tiny_models import ARCHS, VOCAB, Tiny
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

import fastckpt
import fastckpt.transformers as fck_transformers
from fastckpt.errors import DeviceError, FormatError
from fastckpt.integrations import transformers as integ
from fastckpt.integrations.transformers import names, skeleton

TF5 = int(transformers.__version__.split(".")[0]) >= 5
DTYPE = "dtype" if TF5 else "torch_dtype"  # the from_pretrained keyword of this transformers


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t


def assert_same_model(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Same parameter and buffer names, dtypes, shapes, devices and bits; same tying."""
    a = dict(ours.named_parameters(remove_duplicate=False))
    b = dict(ref.named_parameters(remove_duplicate=False))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].device == b[name].device, name
        assert a[name].requires_grad == b[name].requires_grad, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name
    a_buf = dict(ours.named_buffers())
    b_buf = dict(ref.named_buffers())
    assert a_buf.keys() == b_buf.keys()
    for name in a_buf:
        assert a_buf[name].dtype == b_buf[name].dtype, name
        assert a_buf[name].device == b_buf[name].device, name
        assert torch.equal(_bits(a_buf[name]), _bits(b_buf[name])), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours.training == ref.training is False


def _inputs(device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def assert_same_outputs(ours: Any, ref: Any, causal: bool, device: str = "cpu") -> None:
    inputs = _inputs(device)
    with torch.no_grad():
        out_a, out_b = ours(**inputs), ref(**inputs)
    key = "logits" if causal else "last_hidden_state"
    assert torch.equal(out_a[key], out_b[key])
    if causal:
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        gen_a = ours.generate(**inputs, **kw)
        gen_b = ref.generate(**inputs, **kw)
        assert gen_a.shape[1] > inputs["input_ids"].shape[1]
        assert torch.equal(gen_a, gen_b)


def _reference(tiny: Tiny, **kwargs: Any) -> PreTrainedModel:
    """transformers' own load of the source; by default in the stored dtype (load_model's)."""
    if "torch_dtype" not in kwargs:
        kwargs.setdefault(DTYPE, "auto")
    return getattr(transformers, tiny.cls_name).from_pretrained(tiny.src, **kwargs)


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_matches_from_pretrained(
    arch: str, tiny_factory: Callable[[str], Tiny], load_spy: list[Any]
) -> None:
    tiny = tiny_factory(arch)
    model = fastckpt.load_model(tiny.fck)
    ref = _reference(tiny)
    assert type(model) is type(ref)
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, tiny.causal)
    assert model.config.name_or_path == tiny.fck
    # one fastckpt.load of the checkpoint, and the parameters are its tensors (no second copy)
    assert len(load_spy) == 1 and load_spy[0][0] == tiny.fck
    loaded = load_spy[0][2]
    params = dict(model.named_parameters())
    for name, tensor in loaded.items():
        if name in params:
            assert params[name].data_ptr() == tensor.data_ptr(), name


def test_tied_embeddings_stay_tied(tiny_factory: Callable[[str], Tiny]) -> None:
    for arch in ("llama_tied", "gpt2"):
        tiny = tiny_factory(arch)
        index = fastckpt.read_index(tiny.fck)
        assert "lm_head.weight" not in index.tensors  # transformers saved it once
        model = fastckpt.load_model(tiny.fck)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_untied_llama_is_not_tied(tiny_factory: Callable[[str], Tiny]) -> None:
    model = fastckpt.load_model(tiny_factory("llama").fck)
    out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert out_w is not in_w and not torch.equal(out_w, in_w)


def test_checkpoint_aliases_become_one_parameter(
    tiny_factory: Callable[[str], Tiny], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alias in the checkpoint (same tensor object under two names) gives one Parameter."""
    tiny = tiny_factory("llama_tied")
    inner = fastckpt.load

    def with_alias(path: Any, device: Any = "cpu", **kw: Any) -> dict[str, torch.Tensor]:
        out = dict(inner(path, device=device, **kw))
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    monkeypatch.setattr(fastckpt, "load", with_alias)
    model = fastckpt.load_model(tiny.fck)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_model(model, _reference(tiny))


def test_non_persistent_buffers_are_computed(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    index = fastckpt.read_index(tiny.fck)
    assert not any("inv_freq" in n for n in index.names())
    model = fastckpt.load_model(tiny.fck)
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and inv_freq.dtype == torch.float32
    assert torch.all(inv_freq > 0)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bfloat16"])
def test_dtype_casts_like_from_pretrained(
    dtype: Any, tiny_factory: Callable[[str], Tiny], load_spy: list[Any]
) -> None:
    tiny = tiny_factory("llama")
    model = fastckpt.load_model(tiny.fck, dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    ref = _reference(tiny, torch_dtype=want)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == want
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, causal=True)


def test_dtype_none_keeps_stored_bf16_without_copy(
    tiny_factory: Callable[[str], Tiny], load_spy: list[Any]
) -> None:
    tiny = tiny_factory("llama_bf16")
    model = fastckpt.load_model(tiny.fck)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loaded = load_spy[0][2]
    assert model.lm_head.weight.data_ptr() == loaded["lm_head.weight"].data_ptr()
    # dtype="auto" means the config's dtype: bfloat16 here, still no copy
    auto = fastckpt.load_model(tiny.fck, dtype="auto")
    assert auto.lm_head.weight.data_ptr() == load_spy[1][2]["lm_head.weight"].data_ptr()


def test_stock_safetensors_directory_works_too(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("qwen2")
    model = fastckpt.load_model(tiny.src)
    assert_same_model(model, _reference(tiny))


def test_model_class_options(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    by_name = fastckpt.load_model(tiny.fck, model_class="LlamaForCausalLM")
    by_auto = fastckpt.load_model(tiny.fck, model_class=AutoModelForCausalLM)
    assert type(by_name) is type(by_auto) is transformers.LlamaForCausalLM
    # the base model from a causal-LM checkpoint: prefix stripped, lm_head ignored
    base = fastckpt.load_model(tiny.fck, model_class=AutoModel)
    assert type(base) is transformers.LlamaModel
    assert_same_model(base, transformers.LlamaModel.from_pretrained(tiny.src))


def test_base_model_from_head_checkpoint(
    tiny_root: Path, tiny_factory: Callable[[str], Tiny], caplog: pytest.LogCaptureFixture
) -> None:
    """A BertForSequenceClassification checkpoint ('bert.' prefix) loaded as BertModel."""
    from transformers import BertForSequenceClassification

    bert = tiny_factory("bert")
    head = BertForSequenceClassification.from_pretrained(bert.src, num_labels=2)
    src = tiny_root / "bert-cls-src"
    head.save_pretrained(src, safe_serialization=True)
    fck = tiny_root / "bert-cls-fck"
    fastckpt.convert(src, fck)
    with caplog.at_level(logging.WARNING, logger="fastckpt.integrations.transformers"):
        model = fastckpt.load_model(fck, model_class="BertModel")
    assert "own loader" not in caplog.text  # no fallback: the prefix is added to each name
    assert_same_model(model, transformers.BertModel.from_pretrained(src))


def test_head_model_from_base_checkpoint(
    tiny_root: Path, tiny_factory: Callable[[str], Tiny], caplog: pytest.LogCaptureFixture
) -> None:
    """A LlamaModel checkpoint (no 'model.' prefix) loaded as a tied LlamaForCausalLM."""
    tied = tiny_factory("llama_tied")
    src = tiny_root / "llama-base-src"
    transformers.LlamaModel.from_pretrained(tied.src).save_pretrained(src)
    fck = tiny_root / "llama-base-fck"
    fastckpt.convert(src, fck)
    with caplog.at_level(logging.WARNING, logger="fastckpt.integrations.transformers"):
        model = fastckpt.load_model(fck, model_class="LlamaForCausalLM")
    assert "own loader" not in caplog.text
    ref = transformers.LlamaForCausalLM.from_pretrained(src)
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, causal=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_head_falls_back_to_transformers(
    tiny_factory: Callable[[str], Tiny], caplog: pytest.LogCaptureFixture
) -> None:
    """A new classification head is initialised by transformers; every loaded weight matches."""
    tiny = tiny_factory("llama")
    cls = transformers.LlamaForSequenceClassification
    with caplog.at_level(logging.WARNING, logger="fastckpt.integrations.transformers"):
        model = fastckpt.load_model(tiny.fck, model_class=cls, num_labels=3)
    assert "transformers' own loader" in caplog.text and "score.weight" in caplog.text
    ref = cls.from_pretrained(tiny.src, num_labels=3, **{DTYPE: "auto"})
    assert model.score.weight.shape == (3, 32) and not model.score.weight.is_meta
    for name, param in ref.named_parameters():
        if not name.startswith("score."):
            assert torch.equal(_bits(model.get_parameter(name)), _bits(param)), name
    assert not model.training


def test_renamed_legacy_weights_fall_back(tiny_root: Path, tiny_factory: Callable[[str], Tiny]):
    """Old BERT names (LayerNorm.gamma/beta) are renamed by transformers itself."""
    from safetensors.torch import load_file, save_file

    bert = tiny_factory("bert")
    src = tiny_root / "bert-legacy-src"
    shutil.copytree(bert.src, src)
    state = load_file(str(src / "model.safetensors"))
    legacy = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert renamed.keys() != state.keys()
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    fck = tiny_root / "bert-legacy-fck"
    fastckpt.convert(src, fck)
    ref = transformers.BertModel.from_pretrained(src, **{DTYPE: "auto"})
    assert_same_model(fastckpt.load_model(fck), ref)


def test_config_overrides_and_attn_implementation(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    model = fastckpt.load_model(tiny.fck, attn_implementation="eager", output_attentions=True)
    assert model.config._attn_implementation == "eager"
    assert model.config.output_attentions is True
    assert_same_outputs(model, _reference(tiny, attn_implementation="eager"), causal=True)


def test_device_maps_on_cpu(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    ref = _reference(tiny)
    for device in ("cpu", torch.device("cpu"), {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}):
        assert_same_model(fastckpt.load_model(tiny.fck, device=device), ref)
    if not torch.cuda.is_available():
        assert_same_model(fastckpt.load_model(tiny.fck, device="auto"), ref)


def test_device_map_is_translated_to_checkpoint_names(
    tiny_factory: Callable[[str], Tiny],
) -> None:
    """A map in model names (LlamaModel) reaches the loader in checkpoint names."""
    tiny = tiny_factory("llama")
    index = fastckpt.read_index(tiny.fck)
    with skeleton.parameters_on_meta():
        model = transformers.LlamaModel(transformers.LlamaConfig.from_pretrained(tiny.src))
    slots = names.model_slots(model)
    shapes = {name: index.entry(name).shape for name in index.names()}
    missing, unexpected, mismatched = names.match_names(model, slots, shapes)
    assert missing == [] and mismatched == [] and unexpected == ["lm_head.weight"]
    device_map = {"embed_tokens": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "": "cpu"}
    out = names.checkpoint_device_map(index, slots, device_map)
    assert out.keys() == set(index.tensors)
    assert out["model.embed_tokens.weight"] == "cuda:0"
    assert out["model.layers.0.mlp.up_proj.weight"] == "cuda:0"
    assert out["model.layers.1.self_attn.q_proj.weight"] == "cuda:1"
    assert out["model.norm.weight"] == "cpu" and out["lm_head.weight"] == "cpu"


def test_generation_config_is_carried(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    assert "generation_config.json" in os.listdir(tiny.fck)
    model = fastckpt.load_model(tiny.fck)
    assert model.generation_config.to_dict() == _reference(tiny).generation_config.to_dict()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_load_model_on_a_file_says_it_wants_a_folder(
    tiny_factory: Callable[[str], Tiny],
) -> None:
    weights = Path(tiny_factory("llama").src) / "model.safetensors"
    with pytest.raises(NotADirectoryError, match="model folder"):
        fastckpt.load_model(weights)


def test_missing_directory_and_config(tmp_path: Path, tiny_factory: Callable[[str], Tiny]) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        fastckpt.load_model(tmp_path / "nope")
    tiny = tiny_factory("llama")
    bare = tmp_path / "bare"
    shutil.copytree(tiny.fck, bare)
    os.remove(bare / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        fastckpt.load_model(bare)
    (bare / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="load_lora"):
        fastckpt.load_model(bare)


@pytest.mark.parametrize(
    "device",
    ["meta", "disk", "tpu:0", "cuda:banana", -1, True, 1.5, {"": "disk"}, {}, {3: "cpu"}],
)
def test_bad_devices(device: Any, tiny_factory: Callable[[str], Tiny], load_spy: list[Any]) -> None:
    with pytest.raises(DeviceError):
        fastckpt.load_model(tiny_factory("llama").fck, device=device)
    assert load_spy == []  # refused before reading any data


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda(tiny_factory: Callable[[str], Tiny], load_spy: list[Any]) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        fastckpt.load_model(tiny_factory("llama").fck, device="cuda:0")
    assert load_spy == []


def test_device_map_must_cover_every_module(
    tiny_factory: Callable[[str], Tiny], load_spy: list[Any]
) -> None:
    with pytest.raises(DeviceError, match="lm_head"):
        fastckpt.load_model(tiny_factory("llama").fck, device={"model": "cpu", "x": "cpu:1"})
    assert load_spy == []


def test_bad_options(tiny_factory: Callable[[str], Tiny], load_spy: list[Any]) -> None:
    fck = tiny_factory("llama").fck
    with pytest.raises(ValueError, match="dtype"):
        fastckpt.load_model(fck, dtype="float33")
    with pytest.raises(ValueError, match="NoSuchModel"):
        fastckpt.load_model(fck, model_class="NoSuchModel")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastckpt.load_model(fck, model_class=torch.nn.Linear)
    with pytest.raises(TypeError, match="not_an_option"):
        fastckpt.load_model(fck, not_an_option=1)
    with pytest.raises(ValueError, match="max_memory"):
        fastckpt.load_model(fck, max_memory={"cpu": 10**9})
    with pytest.raises(TypeError, match="config"):
        fastckpt.load_model(fck, config={"model_type": "llama"})
    assert load_spy == []


def test_shape_mismatch_is_refused_before_loading(
    tiny_factory: Callable[[str], Tiny], load_spy: list[Any]
) -> None:
    with pytest.raises(FormatError, match=r"lm_head\.weight") as info:
        fastckpt.load_model(tiny_factory("llama").fck, vocab_size=VOCAB + 4)
    assert info.value.path == tiny_factory("llama").fck
    assert load_spy == []


def test_quantized_config_is_refused(tmp_path: Path, tiny_factory: Callable[[str], Tiny]) -> None:
    import json

    fck = tmp_path / "q"
    shutil.copytree(tiny_factory("llama").fck, fck)
    config = json.loads((fck / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (fck / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantiz"):
        fastckpt.load_model(fck)


# --------------------------------------------------------------------------------------------
# the drop-in
# --------------------------------------------------------------------------------------------


def test_enable_routes_auto_and_concrete_classes(
    tiny_factory: Callable[[str], Tiny], load_spy: list[Any], drop_in_off: None
) -> None:
    tiny = tiny_factory("llama")
    ref = _reference(tiny)
    fck_transformers.enable()
    assert fck_transformers.is_enabled()
    for cls in (AutoModelForCausalLM, transformers.LlamaForCausalLM):
        model = cls.from_pretrained(tiny.fck)
        assert_same_model(model, ref)
        assert_same_outputs(model, ref, causal=True)
    assert [c[0] for c in load_spy] == [tiny.fck, tiny.fck]
    bert = tiny_factory("bert")
    model = AutoModel.from_pretrained(bert.fck)
    assert_same_model(model, transformers.BertModel.from_pretrained(bert.src))


ARCH_PARAMS = [pytest.param(a, marks=pytest.mark.slow) if a != "llama" else a for a in ARCHS]


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_drop_in_serves_stock_folders(
    arch: str, tiny_factory: Callable[[str], Tiny], load_spy: list[Any], drop_in_off: None
) -> None:
    """An ordinary save_pretrained folder goes through fastckpt, bitwise as transformers."""
    tiny = tiny_factory(arch)
    cls = getattr(transformers, tiny.cls_name)
    ref = cls.from_pretrained(tiny.src)
    with fck_transformers.enabled():
        model = cls.from_pretrained(tiny.src)
    assert [c[0] for c in load_spy] == [tiny.src]
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, causal=tiny.causal)
    assert model.config.name_or_path == ref.config.name_or_path


def test_drop_in_serves_sharded_stock_folders(
    tmp_path: Path, tiny_factory: Callable[[str], Tiny], load_spy: list[Any], drop_in_off: None
) -> None:
    tiny = tiny_factory("llama_tied")
    src = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(tiny.src).save_pretrained(
        src, max_shard_size="20KB"
    )
    assert (src / "model.safetensors.index.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(src)
    with fck_transformers.enabled():
        model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu", dtype="auto")
    assert [c[0] for c in load_spy] == [str(src)]
    assert_same_model(model, ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _copy_with_config(tiny: Tiny, dst: Path, **extra: Any) -> Path:
    import json

    shutil.copytree(tiny.src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(extra)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_drop_in_leaves_what_it_cannot_serve_to_transformers(
    tmp_path: Path,
    tiny_factory: Callable[[str], Tiny],
    load_spy: list[Any],
    caplog: pytest.LogCaptureFixture,
    drop_in_off: None,
) -> None:
    """Other weight formats, remote code, quantized configs: stock path, and a debug log why."""
    tiny = tiny_factory("llama")
    ref = _reference(tiny)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(Path(tiny.src) / "config.json", binary)
    torch.save(ref.state_dict(), binary / "pytorch_model.bin")
    remote = _copy_with_config(
        tiny, tmp_path / "remote", auto_map={"AutoModelForCausalLM": "modeling.Custom"}
    )
    quantized = _copy_with_config(
        tiny, tmp_path / "quantized", quantization_config={"quant_method": "no-such-method"}
    )
    logger = "fastckpt.integrations.transformers"
    with fck_transformers.enabled(), caplog.at_level(logging.DEBUG, logger=logger):
        from_bin = transformers.LlamaForCausalLM.from_pretrained(binary)
        from_remote = transformers.LlamaForCausalLM.from_pretrained(remote)
        # whatever transformers makes of an unknown quantization method is its business
        with contextlib.suppress(Exception):
            transformers.LlamaForCausalLM.from_pretrained(quantized)
        with_variant = transformers.LlamaForCausalLM.from_pretrained(tiny.src, key_mapping={})
    assert load_spy == []
    assert_same_model(from_bin, ref)
    assert_same_model(from_remote, ref)
    assert_same_model(with_variant, ref)
    text = caplog.text
    assert "another weight format" in text
    assert "auto_map" in text
    assert "quantization_config" in text
    assert "key_mapping" in text


@pytest.mark.parametrize("key", sorted({"torch_dtype", DTYPE}))
def test_drop_in_honours_dtype_and_device_map(
    key: str, tiny_factory: Callable[[str], Tiny], drop_in_off: None
) -> None:
    tiny = tiny_factory("mistral")
    options: dict[str, Any] = {key: torch.bfloat16, "device_map": "cpu", "low_cpu_mem_usage": True}
    ref = AutoModelForCausalLM.from_pretrained(tiny.src, **options)
    with fck_transformers.enabled():
        model = AutoModelForCausalLM.from_pretrained(tiny.fck, **options)
        auto = AutoModelForCausalLM.from_pretrained(
            tiny.fck, device_map={"": "cpu"}, **{key: "auto"}
        )
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, causal=True)
    assert_same_model(auto, AutoModelForCausalLM.from_pretrained(tiny.src, **{key: "auto"}))


def test_drop_in_default_dtype_matches_installed_transformers(
    tiny_factory: Callable[[str], Tiny], drop_in_off: None
) -> None:
    tiny = tiny_factory("llama_bf16")
    ref = AutoModelForCausalLM.from_pretrained(tiny.src)
    with fck_transformers.enabled():
        model = AutoModelForCausalLM.from_pretrained(tiny.fck)
    assert_same_model(model, ref)


def test_drop_in_output_loading_info(
    tiny_factory: Callable[[str], Tiny], drop_in_off: None
) -> None:
    tiny = tiny_factory("llama")
    with fck_transformers.enabled():
        model, info = AutoModelForCausalLM.from_pretrained(tiny.fck, output_loading_info=True)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"quantization_config": {"load_in_8bit": True}}, ValueError),
        ({"offload_folder": "/tmp/x"}, ValueError),
        ({"variant": "fp16"}, ValueError),
        ({"tp_plan": "auto"}, ValueError),
        ({"dtype": {"": torch.float16}}, ValueError),
        ({"device_map": "disk"}, DeviceError),
        ({"not_a_real_option": 3}, TypeError),
    ],
)
def test_drop_in_refuses_unsupported_kwargs(
    kwargs: dict[str, Any],
    error: type[Exception],
    tiny_factory: Callable[[str], Tiny],
    load_spy: list[Any],
    drop_in_off: None,
) -> None:
    with fck_transformers.enabled(), pytest.raises(error):
        transformers.LlamaForCausalLM.from_pretrained(tiny_factory("llama").fck, **kwargs)
    assert load_spy == []


def test_drop_in_refuses_positional_model_args(
    tiny_factory: Callable[[str], Tiny], drop_in_off: None
) -> None:
    with fck_transformers.enabled(), pytest.raises(TypeError, match="positional"):
        transformers.LlamaForCausalLM.from_pretrained(tiny_factory("llama").fck, object())


def test_enable_is_idempotent_and_disable_restores(drop_in_off: None) -> None:
    original = PreTrainedModel.__dict__["from_pretrained"]
    fck_transformers.disable()  # no-op when off
    assert PreTrainedModel.__dict__["from_pretrained"] is original
    fck_transformers.enable()
    patched = PreTrainedModel.__dict__["from_pretrained"]
    assert patched is not original
    fck_transformers.enable()
    assert PreTrainedModel.__dict__["from_pretrained"] is patched
    with fck_transformers.enabled():  # nested: leaves it enabled
        pass
    assert fck_transformers.is_enabled()
    fck_transformers.disable()
    assert PreTrainedModel.__dict__["from_pretrained"] is original
    assert not fck_transformers.is_enabled()
    with fck_transformers.enabled():
        assert fck_transformers.is_enabled()
    assert PreTrainedModel.__dict__["from_pretrained"] is original


def test_disable_refuses_to_clobber_a_later_patch(drop_in_off: None) -> None:
    fck_transformers.enable()
    ours = PreTrainedModel.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = classmethod(lambda cls, *a, **k: None)  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="someone else"):
            fck_transformers.disable()
    finally:
        PreTrainedModel.from_pretrained = ours  # type: ignore[method-assign]
    fck_transformers.disable()
    assert not fck_transformers.is_enabled()


def test_public_names() -> None:
    assert fastckpt.load_model is integ.load_model
    assert fck_transformers.load_model is integ.load_model
    assert fck_transformers.is_fastckpt_checkpoint("/nonexistent") is False


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "bert"])
def test_gpu_load_model_matches_from_pretrained(
    arch: str, tiny_factory: Callable[[str], Tiny], drop_in_off: None
) -> None:
    tiny = tiny_factory(arch)
    ref = _reference(tiny, device_map="cuda:0")
    model = fastckpt.load_model(tiny.fck, device="cuda:0")
    assert model.device.type == "cuda"
    assert_same_model(model, ref)
    assert_same_outputs(model, ref, tiny.causal, device="cuda:0")
    with fck_transformers.enabled():
        drop = getattr(transformers, tiny.cls_name).from_pretrained(tiny.fck, device_map="cuda")
    assert_same_model(drop, ref)


@pytest.mark.gpu
def test_gpu_device_map_with_prefix_change(tiny_factory: Callable[[str], Tiny]) -> None:
    """LlamaModel from a LlamaForCausalLM checkpoint, split over the GPU and the CPU."""
    tiny = tiny_factory("llama")
    device_map = {"embed_tokens": 0, "layers": 0, "rotary_emb": 0, "norm": "cpu"}
    model = fastckpt.load_model(tiny.fck, model_class="LlamaModel", device=device_map)
    assert model.embed_tokens.weight.device.type == "cuda"
    ref = transformers.LlamaModel.from_pretrained(tiny.src, device_map=device_map)
    inputs = _inputs("cuda:0")
    with torch.no_grad():
        out_a = model(**inputs).last_hidden_state.cpu()
        assert torch.equal(out_a, ref(**inputs).last_hidden_state.cpu())


@pytest.mark.gpu
def test_gpu_split_device_map(tiny_factory: Callable[[str], Tiny]) -> None:
    tiny = tiny_factory("llama")
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {"model.rotary_emb": 0}
    ref = _reference(tiny, device_map=device_map)
    model = fastckpt.load_model(tiny.fck, device=device_map)
    assert model.hf_device_map == {k: ("cuda:0" if v == 0 else v) for k, v in device_map.items()}
    inputs = _inputs("cuda:0")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits.cpu(), ref(**inputs).logits.cpu())
