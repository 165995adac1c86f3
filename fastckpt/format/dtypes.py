"""Dtype registry shared by the format, the planner and the loader. Imports no torch.

A dtype has one canonical name (torch's attribute name, e.g. ``bfloat16``), an element size in
bytes, and (where one exists) the safetensors code. ``torch_dtype()`` resolves a name lazily and
raises ``DtypeError`` when the installed torch lacks it (e.g. float8 on an old torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastckpt.errors import DtypeError


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    safetensors: str | None


_ALL: tuple[DType, ...] = (
    DType("float64", 8, "F64"),
    DType("float32", 4, "F32"),
    DType("float16", 2, "F16"),
    DType("bfloat16", 2, "BF16"),
    DType("float8_e4m3fn", 1, "F8_E4M3"),
    DType("float8_e5m2", 1, "F8_E5M2"),
    DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ"),
    DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ"),
    DType("float8_e8m0fnu", 1, "F8_E8M0"),
    DType("float4_e2m1fn_x2", 1, "F4"),
    DType("int8", 1, "I8"),
    DType("int16", 2, "I16"),
    DType("int32", 4, "I32"),
    DType("int64", 8, "I64"),
    DType("uint8", 1, "U8"),
    DType("uint16", 2, "U16"),
    DType("uint32", 4, "U32"),
    DType("uint64", 8, "U64"),
    DType("bool", 1, "BOOL"),
    DType("complex64", 8, "C64"),
    DType("complex128", 16, None),
)

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}

TORCH_SINCE: dict[str, str] = {
    "float8_e4m3fn": "2.1",
    "float8_e5m2": "2.1",
    "float8_e4m3fnuz": "2.2",
    "float8_e5m2fnuz": "2.2",
    "float8_e8m0fnu": "2.7",
    "float4_e2m1fn_x2": "2.8",
    "uint16": "2.3",
    "uint32": "2.3",
    "uint64": "2.3",
}
"""The first torch release with each dtype that older releases lack (for error messages)."""
_BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL if d.safetensors}


def get(name: str, *, path: str | None = None, tensor: str | None = None) -> DType:
    """Look up a canonical dtype name; ``DtypeError`` names the unknown value."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise DtypeError(
            f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPES))}",
            path=path,
            tensor=tensor,
        ) from None


def from_safetensors(code: str, *, path: str | None = None, tensor: str | None = None) -> DType:
    """Map a safetensors dtype code (``BF16``, ``F8_E4M3``, ...) to a ``DType``."""
    try:
        return _BY_SAFETENSORS[code]
    except (KeyError, TypeError):
        supported = ", ".join(sorted(_BY_SAFETENSORS))
        raise DtypeError(
            f"unsupported safetensors dtype {code!r}; supported: {supported}",
            path=path,
            tensor=tensor,
        ) from None


def torch_dtype(name: str, *, path: str | None = None, tensor: str | None = None) -> Any:
    """The ``torch.dtype`` for a canonical name (imports torch)."""
    import torch

    get(name, path=path, tensor=tensor)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        since = TORCH_SINCE.get(name)
        hint = f"; torch {since} or newer has it" if since else ""
        raise DtypeError(
            f"dtype {name!r} is not supported by the installed torch {torch.__version__}{hint}",
            path=path,
            tensor=tensor,
        )
    return dt


def name_of(torch_dtype_obj: Any, *, tensor: str | None = None) -> str:
    """Canonical name of a ``torch.dtype`` (``torch.bfloat16`` -> ``bfloat16``)."""
    text = str(torch_dtype_obj)
    name = text.removeprefix("torch.")
    if name not in DTYPES:
        raise DtypeError(f"tensor dtype {text} cannot be stored by fastckpt", tensor=tensor)
    return name
