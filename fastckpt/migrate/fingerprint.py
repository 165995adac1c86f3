"""Model identity for token states: a fingerprint that a target compares before accepting one.

``checkpoint_fingerprint`` reads only files (no torch) and is known before the weights are
loaded; ``model_fingerprint`` digests a loaded model (torch, imported when called). Both sides of
a migration must use the same scheme.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def model_fingerprint(model: Any) -> str:
    """A digest of a model's identity: class, config, and each tensor's name, shape, dtype and
    first and last values. Cheap (reads a few bytes per tensor), yet differs for different
    weights, architectures or dtypes."""
    import torch

    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for k in _VOLATILE_CONFIG_KEYS:
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            ends = torch.cat([flat[:32], flat[-32:]]).to("cpu").contiguous()
            h.update(ends.view(torch.uint8).numpy().tobytes())
    return "model-sha256:" + h.hexdigest()[:32]


def checkpoint_fingerprint(path: str | os.PathLike[str], dtype: Any = None) -> str:
    """A fingerprint of a checkpoint directory known before its weights are loaded.

    For a fastckpt checkpoint, the digest of its index (which holds a CRC32C of every chunk of
    data, so it covers every weight). For a stock folder, the digest of ``config.json``, each
    safetensors header and 16 evenly spaced 4 KiB windows of each file's data. The load
    ``dtype`` is part of it (``None``: as stored).
    """
    root = os.fspath(path)
    h = hashlib.sha256()
    h.update(f"dtype={dtype}|".encode())
    index = os.path.join(root, "fastckpt.index")
    if os.path.exists(index):
        with open(index, "rb") as f:
            h.update(f.read())
        return "ckpt-sha256:" + h.hexdigest()[:32]
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name == "config.json":
            with open(full, "rb") as f:
                h.update(name.encode() + f.read())
        elif name.endswith(".safetensors"):
            size = os.path.getsize(full)
            h.update(f"{name}|{size}|".encode())
            with open(full, "rb") as f:
                head = f.read(8)
                header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(f.read(min(header_len, 100 << 20)))
                start = 8 + header_len
                span = max(0, size - start - 4096)
                for k in range(16):
                    f.seek(start + span * k // 15)
                    h.update(f.read(4096))
    return "ckpt-sha256:" + h.hexdigest()[:32]


__all__ = ["checkpoint_fingerprint", "model_fingerprint"]
