"""The transformers drop-in, under the name users reach for.

    import fastckpt.transformers
    fastckpt.transformers.enable()          # or: with fastckpt.transformers.enabled(): ...
    model = AutoModelForCausalLM.from_pretrained("/models/llama-fastckpt", device_map="cuda:0")

With the drop-in enabled, ``from_pretrained`` of every transformers model class (Auto classes
included) loads a local fastckpt checkpoint through :func:`fastckpt.load_model`; any other path
is loaded by transformers unchanged. Implemented in ``fastckpt.integrations.transformers``.
"""

from __future__ import annotations

from fastckpt.integrations.transformers import (
    disable,
    enable,
    enabled,
    is_enabled,
    is_fastckpt_checkpoint,
    load_model,
)

__all__ = ["disable", "enable", "enabled", "is_enabled", "is_fastckpt_checkpoint", "load_model"]
