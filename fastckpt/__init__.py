"""fastckpt: load large model checkpoints into GPU or CPU memory as fast as the hardware allows."""

from __future__ import annotations

from fastckpt.errors import (
    ChecksumError,
    DestinationExistsError,
    DeviceError,
    FormatError,
)

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "DestinationExistsError",
    "DeviceError",
    "FormatError",
    "__version__",
]
