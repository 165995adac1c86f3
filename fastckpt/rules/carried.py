"""Which files of a checkpoint directory are carried over verbatim (no torch).

A converted or loaded checkpoint keeps its directory's other files (``config.json``, tokenizer
files, ...) beside the weights. A top-level regular file is carried unless it is hidden (starts
with ``.``), is fastckpt's own index or a partition, holds weights in any framework's format
(``WEIGHT_SUFFIXES``), or is the shard index of such a file (``model.safetensors.index.json``).
This module holds the name rule only; the directory walks (``fastckpt.format.safetensors.
carried_files`` and the converter's sources) open files beneath their directory (FORMAT.md §8).
"""

from __future__ import annotations

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


__all__ = ["INDEX_FILE", "WEIGHT_SUFFIXES", "is_carried_name", "is_weight_file"]
