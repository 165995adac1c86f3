"""Which files of a checkpoint directory are carried over verbatim (no torch).

A converted or loaded checkpoint keeps its directory's other files (``config.json``, tokenizer
files, ...) beside the weights. A top-level regular file is carried unless it is hidden (starts
with ``.``), is fastckpt's own index or a partition, holds weights in any framework's format
(``WEIGHT_SUFFIXES``), or is the shard index of such a file (``model.safetensors.index.json``).
The name rule (``is_carried_name``) is separate from the directory walk (``carried_files``) so
both call sites (conversion sources and stock safetensors folders) share it.
"""

from __future__ import annotations

import os
import stat

# fastckpt's own index file (``fastckpt.format.spec.INDEX_FILE``; spelled out so this module
# imports nothing of the package; a test checks the two agree).
INDEX_FILE = "fastckpt.index"

# File name endings (lower case) that hold weights in some framework: never carried.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".fckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".ot",
    ".tflite",
    ".pkl",
    ".pickle",
    ".npz",
    ".npy",
)


def is_weight_file(name: str) -> bool:
    """True for a file holding weights, its shard index, or fastckpt's index."""
    lower = name.lower()
    if lower.endswith(".index.json"):
        lower = lower[: -len(".index.json")]
    return lower.endswith(WEIGHT_SUFFIXES) or lower == INDEX_FILE


def is_carried_name(name: str) -> bool:
    """True when a top-level file called ``name`` is carried (hidden and weight files are not)."""
    return bool(name) and not name.startswith(".") and not is_weight_file(name)


def carried_files(root: str) -> list[str]:
    """Sorted names of ``root``'s top-level regular files that ``is_carried_name`` accepts
    (links are followed; entries that vanish or cannot be stat-ed are skipped)."""
    out = []
    for name in sorted(os.listdir(root)):
        if not is_carried_name(name):
            continue
        try:
            st = os.stat(os.path.join(root, name))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.append(name)
    return out


__all__ = ["INDEX_FILE", "WEIGHT_SUFFIXES", "carried_files", "is_carried_name", "is_weight_file"]
