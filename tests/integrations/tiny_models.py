"""Tiny transformers models with random weights, saved and converted once per session.

Nothing is downloaded: every model is built from a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastckpt  # noqa: E402

VOCAB = 96


@dataclass(frozen=True)
class Tiny:
    """A saved tiny model: its source directory (save_pretrained) and its fastckpt copy."""

    name: str
    cls_name: str
    src: str
    fck: str
    causal: bool


def _randomise(model: Any, seed: int) -> None:
    """Every floating parameter gets distinct random values (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.05
            if name.endswith("norm.weight") or "LayerNorm.weight" in name or "ln_" in name:
                noise += 1.0
            param.copy_(noise.to(param.dtype))


def _configs() -> dict[str, tuple[str, Any, Any]]:
    from transformers import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    small = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return {
        "llama": ("LlamaForCausalLM", LlamaConfig(**small, tie_word_embeddings=False), None),
        "llama_tied": ("LlamaForCausalLM", LlamaConfig(**small, tie_word_embeddings=True), None),
        "llama_bf16": (
            "LlamaForCausalLM",
            LlamaConfig(**small, tie_word_embeddings=False),
            torch.bfloat16,
        ),
        "qwen2": ("Qwen2ForCausalLM", Qwen2Config(**small, tie_word_embeddings=False), None),
        "mistral": ("MistralForCausalLM", MistralConfig(**small, tie_word_embeddings=False), None),
        "gpt2": (
            "GPT2LMHeadModel",
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                # inside the tiny vocabulary (the defaults, 50256, make transformers warn)
                bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1,
            ),
            None,
        ),
        "bert": (
            "BertModel",
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            None,
        ),
    }


ARCHS = list(_configs())


def build_tiny(name: str, root: Path, seed: int = 0) -> Tiny:
    cls_name, config, dtype = _configs()[name]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(config)
    _randomise(model, seed)
    if dtype is not None:
        model = model.to(dtype)
        model.config.torch_dtype = dtype
    src = root / f"{name}-src"
    model.save_pretrained(src, safe_serialization=True)
    fck = root / f"{name}-fck"
    fastckpt.convert(src, fck)
    return Tiny(name, cls_name, str(src), str(fck), model.can_generate())
