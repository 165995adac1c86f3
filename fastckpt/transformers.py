"""The transformers drop-in, under the name users reach for.

    import fastckpt.transformers
    fastckpt.transformers.enable()          # or: with fastckpt.transformers.enabled(): ...
    model = AutoModelForCausalLM.from_pretrained("/models/llama-fastckpt", device_map="cuda:0")

With the drop-in enabled, ``from_pretrained`` of every transformers model class (Auto classes
included) loads a local fastckpt checkpoint, and an ordinary local safetensors model folder (one
``model.safetensors`` or sharded with ``model.safetensors.index.json``), through
:func:`fastckpt.load_model`, bit for bit as transformers would. Anything else (hub names, other
weight formats, quantization configs, custom code in ``auto_map``, options fastckpt does not
support, peft adapter folders) is loaded by transformers unchanged, with a debug log on
``fastckpt.integrations.transformers`` saying why (a warning for a file or a local path that does
not exist, which transformers would only call an invalid Hub repo id). Implemented in
``fastckpt.integrations.transformers``.
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
