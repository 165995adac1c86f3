"""fastckpt: load large model checkpoints into GPU or CPU memory as fast as the hardware allows.

Importing ``fastckpt`` is cheap: it imports neither torch nor the C++ core. Each public name is
resolved on first use from the module that implements it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastckpt._version import __version__
from fastckpt.errors import (
    BadMagicError,
    ChecksumError,
    CorruptDataError,
    CorruptIndexError,
    DestinationExistsError,
    DeviceError,
    DtypeError,
    FastckptError,
    FormatError,
    InvalidNameError,
    LimitError,
    MissingPartitionError,
    OutOfBoundsError,
    OverlapError,
    SourceError,
    SymlinkLoopError,
    TruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
)

# public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "save": ("fastckpt.format.writer", "save"),
    "convert": ("fastckpt.loader.remotefiles", "convert"),
    "read_index": ("fastckpt.format.reader", "read_index"),
    "info": ("fastckpt.format.info", "info"),
    "verify": ("fastckpt.format.verify", "verify"),
    "load": ("fastckpt.loader.api", "load"),
    "Loader": ("fastckpt.loader.session", "Loader"),
    "LoadStats": ("fastckpt.loader.stats", "LoadStats"),
    "last_stats": ("fastckpt.loader.stats", "last_stats"),
    "engine_info": ("fastckpt.io_engine", "engine_info"),
    "load_model": ("fastckpt.integrations.transformers", "load_model"),
    "load_lora": ("fastckpt.integrations.peft", "load_lora"),
    "open": ("fastckpt.loader.lazy", "open"),
    "iter_tensors": ("fastckpt.loader.stream", "iter_tensors"),
}

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.format.info import info
    from fastckpt.format.reader import read_index
    from fastckpt.format.verify import verify
    from fastckpt.format.writer import save
    from fastckpt.integrations.peft import load_lora
    from fastckpt.integrations.transformers import load_model
    from fastckpt.io_engine import engine_info
    from fastckpt.loader.api import load
    from fastckpt.loader.lazy import open as open
    from fastckpt.loader.remotefiles import convert
    from fastckpt.loader.session import Loader
    from fastckpt.loader.stats import LoadStats, last_stats
    from fastckpt.loader.stream import iter_tensors


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastckpt' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


# ``open`` is public (``fastckpt.open``) but not in __all__: ``from fastckpt import *`` must not
# shadow the builtin.
__all__ = [
    "BadMagicError",
    "ChecksumError",
    "CorruptDataError",
    "CorruptIndexError",
    "DestinationExistsError",
    "DeviceError",
    "DtypeError",
    "FastckptError",
    "FormatError",
    "InvalidNameError",
    "LimitError",
    "LoadStats",
    "Loader",
    "MissingPartitionError",
    "OutOfBoundsError",
    "OverlapError",
    "SourceError",
    "SymlinkLoopError",
    "TruncatedError",
    "UnsafePathError",
    "UnsupportedVersionError",
    "__version__",
    "convert",
    "engine_info",
    "info",
    "iter_tensors",
    "last_stats",
    "load",
    "load_lora",
    "load_model",
    "read_index",
    "save",
    "verify",
]
