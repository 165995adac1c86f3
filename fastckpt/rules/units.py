"""Byte sizes: one parser and one formatter for every command and report (no torch).

One convention for every command and report, stated once here: decimal unless the unit says
``iB``, the same units the sizes and rates are printed in.

- ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB`` are decimal: ``2G`` = ``2GB`` = 2 * 10**9;
- ``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary: ``2GiB`` = 2 * 2**30 bytes;
- ``B`` or no unit: bytes. Units are case-insensitive; blanks around the number are ignored.

The number may have a fraction (``1.5GiB``) but the result must be a whole number of bytes,
at least 1. Formatting is decimal with three significant digits (``7.81 GB``), the unit the
benchmark reports GB/s in.
"""

from __future__ import annotations

import re
from fractions import Fraction

from fastckpt.errors import FastckptError

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_UNITS = {
    "": 1,
    "b": 1,
    "kb": KB,
    "mb": MB,
    "gb": GB,
    "tb": TB,
    "k": KB,
    "kib": KiB,
    "m": MB,
    "mib": MiB,
    "g": GB,
    "gib": GiB,
    "t": TB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class SizeError(FastckptError, ValueError):
    """A size argument is not a whole number of bytes with a known unit."""


def parse_size(text: object) -> int:
    """Bytes for ``4096``, ``4KiB``, ``512MB``, ``1.5G`` (see the module docstring)."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise SizeError(
            f"invalid size {text!r}: use a number with an optional unit, e.g. 4GiB, 512MB, 1G "
            "(K/M/G/T and KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB powers of 1024)"
        )
    value = Fraction(match.group(1)) * _UNITS[unit]
    if value < 1 or value.denominator != 1:
        raise SizeError(f"invalid size {text!r}: must be a whole number >= 1 B")
    return int(value)


def size_arg(text: str) -> int:
    """``parse_size`` as an ``argparse`` type (its error becomes a usage error)."""
    import argparse

    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_bytes(nbytes: float) -> str:
    """Decimal units, three significant digits: ``7.81 GB``, ``512 MB``, ``12 B``."""
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"


def format_rate(nbytes: float, seconds: float) -> str:
    """A throughput in GB/s (decimal, as every benchmark reports it)."""
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "- GB/s"


__all__ = [
    "GB",
    "KB",
    "MB",
    "TB",
    "GiB",
    "KiB",
    "MiB",
    "SizeError",
    "TiB",
    "format_bytes",
    "format_rate",
    "parse_size",
    "size_arg",
]
