"""load_lora against peft's own PeftModel.from_pretrained / load_adapter."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import VOCAB, Tiny

import fastckpt
from fastckpt.errors import DeviceError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


@dataclass(frozen=True)
class Adapter:
    src: str
    fck: str


def _make_adapter(base_src: str, root: Path, name: str, seed: int, **lora: Any) -> Adapter:
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_src), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:  # lora_B starts at zero: randomise so the adapter does something
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    src = root / f"{name}-src"
    model.save_pretrained(src)
    fck = root / f"{name}-fck"
    fastckpt.convert(src, fck)
    return Adapter(str(src), str(fck))


@pytest.fixture(scope="module")
def adapters(
    tiny_factory: Callable[[str], Tiny], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Adapter]:
    base = tiny_factory("llama").src
    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn": _make_adapter(
            base, root, "attn", 1, r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        "mlp": _make_adapter(
            base,
            root,
            "mlp",
            2,
            r=2,
            lora_alpha=8,
            target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    }


def _base(tiny: Tiny, dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        tf5 = int(transformers.__version__.split(".")[0]) >= 5
        kwargs["dtype" if tf5 else "torch_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(tiny.src, **kwargs)


def _logits(model: Any, device: str = "cpu") -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def assert_same_peft(ours: Any, ref: Any) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
    grads_a = {n: p.requires_grad for n, p in ours.named_parameters()}
    grads_b = {n: p.requires_grad for n, p in ref.named_parameters()}
    assert grads_a == grads_b
    assert ours.training == ref.training
    assert ours.active_adapter == ref.active_adapter
    assert dict(ours.peft_config).keys() == dict(ref.peft_config).keys()


def test_load_lora_matches_peft(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter], load_spy: list[Any]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(_base(tiny), adapters["attn"].fck)
    ref = PeftModel.from_pretrained(_base(tiny), adapters["attn"].src)
    assert type(ours) is type(ref)
    assert_same_peft(ours, ref)
    assert torch.equal(_logits(ours), _logits(ref))
    assert not torch.equal(_logits(ours), _logits(_base(tiny)))  # the adapter is not a no-op
    assert not ours.training
    # the adapter weights came from fastckpt.load and (peft >= 0.13) were assigned, not copied
    assert [c[0] for c in load_spy] == [adapters["attn"].fck]
    if "low_cpu_mem_usage" in inspect.signature(PeftModel.from_pretrained).parameters:
        loaded = load_spy[0][2]
        lora_params = {n: p for n, p in ours.named_parameters() if "lora_" in n}
        assert lora_params
        ptrs = {t.data_ptr() for t in loaded.values()}
        assert all(p.data_ptr() in ptrs for p in lora_params.values())


def test_generate_matches_peft(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    base = fastckpt.load_model(tiny.fck)
    ours = fastckpt.load_lora(base, adapters["mlp"].fck, adapter_name="m")
    ref = PeftModel.from_pretrained(_base(tiny), adapters["mlp"].src, adapter_name="m")
    ids = torch.tensor([[3, 5, 7, 11]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = ours.generate(input_ids=ids, **kw)
    assert torch.equal(out, ref.generate(input_ids=ids, **kw))


def test_peft_default_copy_path_matches_too(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(_base(tiny), adapters["attn"].fck, low_cpu_mem_usage=False)
    assert_same_peft(ours, PeftModel.from_pretrained(_base(tiny), adapters["attn"].src))


def test_two_adapters_on_one_model(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(_base(tiny), adapters["attn"].fck, adapter_name="a")
    same = fastckpt.load_lora(ours, adapters["mlp"].fck, adapter_name="b")
    assert same is ours
    ref = PeftModel.from_pretrained(_base(tiny), adapters["attn"].src, adapter_name="a")
    ref.load_adapter(adapters["mlp"].src, adapter_name="b")
    assert_same_peft(ours, ref)
    seen = []
    for name in ("a", "b", "a"):
        ours.set_adapter(name)
        ref.set_adapter(name)
        logits = _logits(ours)
        assert torch.equal(logits, _logits(ref)), name
        seen.append(logits)
    assert not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0], seen[2])


def test_trainable_adapter_matches_peft(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(_base(tiny), adapters["attn"].fck, is_trainable=True)
    ref = PeftModel.from_pretrained(_base(tiny), adapters["attn"].src, is_trainable=True)
    assert_same_peft(ours, ref)
    assert any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_model_matches_peft(
    autocast: bool,
    tiny_factory: Callable[[str], Tiny],
    adapters: dict[str, Adapter],
    load_spy: list[Any],
) -> None:
    """A float32 adapter on a bfloat16 base: dtype handling (autocast) is peft's default one."""
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(
        _base(tiny, dtype=torch.bfloat16), adapters["mlp"].fck, autocast_adapter_dtype=autocast
    )
    ref = PeftModel.from_pretrained(
        _base(tiny, dtype=torch.bfloat16), adapters["mlp"].src, autocast_adapter_dtype=autocast
    )
    assert_same_peft(ours, ref)
    assert torch.equal(_logits(ours), _logits(ref))
    assert len(load_spy) == 1


def test_stock_peft_directory_works_too(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter], load_spy: list[Any]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(_base(tiny), adapters["attn"].src)
    assert [c[0] for c in load_spy] == [adapters["attn"].src]
    assert_same_peft(ours, PeftModel.from_pretrained(_base(tiny), adapters["attn"].src))


def test_peft_reader_is_restored(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter], load_spy: list[Any]
) -> None:
    import peft.peft_model as peft_model

    original = peft_model.load_peft_weights
    tiny = tiny_factory("llama")
    fastckpt.load_lora(_base(tiny), adapters["attn"].fck)
    assert peft_model.load_peft_weights is original
    with pytest.raises(TypeError):
        fastckpt.load_lora(_base(tiny), adapters["attn"].fck, bogus=1)
    assert peft_model.load_peft_weights is original
    # a plain peft load afterwards does not go through fastckpt
    PeftModel.from_pretrained(_base(tiny), adapters["mlp"].src)
    assert len(load_spy) == 1


def test_only_the_adapter_being_loaded_is_redirected(
    adapters: dict[str, Adapter], load_spy: list[Any]
) -> None:
    import peft.peft_model as peft_model
    from safetensors.torch import load_file

    from fastckpt.integrations import peft as integ

    attn, mlp = adapters["attn"], adapters["mlp"]
    with integ._serve_from_fastckpt(attn.fck, "cpu", {}):
        served = peft_model.load_peft_weights(attn.fck, device="cpu")
        assert [c[0] for c in load_spy] == [attn.fck]
        other = peft_model.load_peft_weights(mlp.src, device="cpu")
        assert len(load_spy) == 1  # peft's own reader
    stored = load_file(os.path.join(attn.src, "adapter_model.safetensors"))
    assert served.keys() == stored.keys()
    assert all(torch.equal(served[k], stored[k]) for k in stored)
    expected = load_file(os.path.join(mlp.src, "adapter_model.safetensors"))
    assert other.keys() == expected.keys()


def test_errors(
    tmp_path: Path,
    tiny_factory: Callable[[str], Tiny],
    adapters: dict[str, Adapter],
    load_spy: list[Any],
) -> None:
    tiny = tiny_factory("llama")
    base = _base(tiny)
    with pytest.raises(FileNotFoundError, match="not found"):
        fastckpt.load_lora(base, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        fastckpt.load_lora(base, tiny.fck)  # a model, not an adapter
    with pytest.raises(TypeError, match="bogus"):
        fastckpt.load_lora(base, adapters["attn"].fck, bogus=True)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        fastckpt.load_lora("not a model", adapters["attn"].fck)
    with pytest.raises(ValueError, match="adapter_name"):
        fastckpt.load_lora(base, adapters["attn"].fck, adapter_name="")
    with pytest.raises(DeviceError):
        fastckpt.load_lora(base, adapters["attn"].fck, device="tpu")
    peft_model = fastckpt.load_lora(base, adapters["attn"].fck, adapter_name="x")
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        fastckpt.load_lora(peft_model, adapters["mlp"].fck, adapter_name="x")
    assert len(load_spy) == 1


def test_a_file_or_swapped_arguments_say_what_to_do(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    base = _base(tiny)
    weights = os.path.join(adapters["attn"].src, "adapter_model.safetensors")
    with pytest.raises(NotADirectoryError, match="a file, not an adapter directory") as exc:
        fastckpt.load_lora(base, weights)
    assert exc.value.filename == weights and adapters["attn"].src in str(exc.value)
    with pytest.raises(TypeError, match="the model comes first"):
        fastckpt.load_lora(adapters["attn"].fck, base)
    with pytest.raises(TypeError, match="expected the path of an adapter directory"):
        fastckpt.load_lora(base, 3)


def test_public_name() -> None:
    from fastckpt.integrations.peft import load_lora

    assert fastckpt.load_lora is load_lora


@pytest.mark.gpu
def test_gpu_load_lora_matches_peft(
    tiny_factory: Callable[[str], Tiny], adapters: dict[str, Adapter]
) -> None:
    tiny = tiny_factory("llama")
    ours = fastckpt.load_lora(fastckpt.load_model(tiny.fck, device="cuda:0"), adapters["attn"].fck)
    ref = PeftModel.from_pretrained(_base(tiny, device_map="cuda:0"), adapters["attn"].src)
    assert_same_peft(ours, ref)
    assert all(p.device.type == "cuda" for n, p in ours.named_parameters() if "lora_" in n)
    assert torch.equal(_logits(ours, "cuda:0"), _logits(ref, "cuda:0"))
