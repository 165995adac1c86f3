"""The checkpoint format: spec constants, the validated index, readers, verify and info.

No torch here: ``read_index`` and everything it needs import only the standard library (the C++
core is used for CRC32C when it is built).
"""

from __future__ import annotations

from fastckpt.format.index import Index, IndexKind, PartitionEntry, TensorEntry
from fastckpt.format.info import CheckpointInfo, info
from fastckpt.format.reader import read_index
from fastckpt.format.verify import VerifyReport, chunk_bounds, verify

__all__ = [
    "CheckpointInfo",
    "Index",
    "IndexKind",
    "PartitionEntry",
    "TensorEntry",
    "VerifyReport",
    "chunk_bounds",
    "info",
    "read_index",
    "verify",
]
