"""transformers integration: ``load_model`` and the ``from_pretrained`` drop-in.

One concern per module:

- :mod:`.skeleton`: the model class and its skeleton on ``meta`` (buffers on the CPU), dtypes;
- :mod:`.names`: checkpoint names and shapes mapped onto the model's parameters and buffers;
- :mod:`.devices`: devices, device maps and dispatch;
- :mod:`.loading`: ``load_model`` (index read once, one ``fastckpt.load``, tensors assigned);
- :mod:`.switch`: ``enable()`` / ``disable()`` / ``enabled()`` around ``from_pretrained``.
"""

from __future__ import annotations

from fastckpt.integrations.transformers.loading import is_fastckpt_checkpoint, load_model
from fastckpt.integrations.transformers.switch import disable, enable, enabled, is_enabled

__all__ = [
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "is_fastckpt_checkpoint",
    "load_model",
]
