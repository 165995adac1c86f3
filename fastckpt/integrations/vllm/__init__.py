"""vLLM plug-in: ``vllm serve MODEL --load-format fastckpt`` and
``LLM(model=..., load_format="fastckpt")``.

vLLM finds ``register`` through the ``vllm.general_plugins`` entry point that installing
fastckpt declares, and calls it in each of its processes. Importing this package imports neither
vLLM nor torch; ``register`` does. See docs/vllm.md.
"""

from __future__ import annotations

LOAD_FORMAT = "fastckpt"

__all__ = ["LOAD_FORMAT", "register"]

_registered = False


def register() -> None:
    """Register load format ``fastckpt`` with vLLM (idempotent: vLLM may call it more than once
    per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from fastckpt.integrations.vllm.loader import FastckptModelLoader

    register_model_loader(LOAD_FORMAT)(FastckptModelLoader)
    _registered = True
