"""Device canonicalisation and prefix device maps (no torch).

A device is canonical when it is ``"cpu"`` or ``"cuda:N"``. ``canonical_device`` accepts what
users pass: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (any case, surrounding blanks), an ``int`` N (a
CUDA ordinal, as in accelerate) and anything whose ``str()`` is one of those, such as a
``torch.device``. Bare ``"cuda"`` means the current CUDA device: ordinal 0 unless the caller
passes ``current_cuda`` (a function returning the ordinal, e.g. ``torch.cuda.current_device``).

A device map maps dotted name prefixes to devices. The device of a name is the value of the
longest key that equals the name or is a dotted prefix of it (``"model.layers.1"`` covers
``"model.layers.1.mlp.w"``, not ``"model.layers.10.w"``); the key ``""`` is the default.

``None`` is not a device: ``canonical_device(None)`` and a map value of ``None`` raise
``DeviceError`` (to leave a name without a device, leave it out of the map). So a normalised map
holds only canonical strings, and ``device_for`` returns ``None`` only when no key covers the
name (or there is no map). ``check_device_map`` is that shape alone (a mapping, string keys, no
``None``) with the rule for values passed in: the loader's is ``canonical_device``; the writer
(``fastckpt.format.layout``) keeps any non-empty string as a partition's device hint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from fastckpt.errors import DeviceError

_EXPECTED = "expected 'cpu', 'cuda', 'cuda:N', an int or a torch.device"


def canonical_device(value: object, *, current_cuda: Callable[[], int] | None = None) -> str:
    """``"cpu"`` or ``"cuda:N"`` for one user device argument; ``DeviceError`` otherwise."""
    if value is None or isinstance(value, bool):
        raise DeviceError(f"device {value!r} is not a device: {_EXPECTED}")
    if isinstance(value, int):
        if value < 0:
            raise DeviceError(f"device index {value} is negative (a CUDA ordinal is >= 0)")
        return f"cuda:{value}"
    if not isinstance(value, str) and not hasattr(value, "type"):
        raise DeviceError(f"device {value!r} ({type(value).__name__}): {_EXPECTED}")
    text = str(value).strip().lower()
    if text == "cpu":
        return "cpu"
    if text.startswith("cpu:") and text[4:].isdigit():  # torch.device("cpu:0") spelling
        return "cpu"
    if text == "cuda":
        return f"cuda:{current_cuda() if current_cuda is not None else 0}"
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    if text in ("disk", "meta"):
        raise DeviceError(
            f"device {str(value)!r} is not supported: fastckpt loads weights into memory "
            "(use 'cpu' or a CUDA device)"
        )
    raise DeviceError(
        f"unsupported device {str(value)!r}: fastckpt loads to 'cpu', 'cuda' or 'cuda:N' "
        "(or a device map of those)"
    )


def check_device_map(device_map: object, value: Callable[[str, object], str]) -> dict[str, str]:
    """The shape every device map has: a mapping with string keys (name prefixes) and no
    ``None`` value; each value becomes ``value(key, v)``, which raises ``DeviceError`` for a
    value it does not accept. ``DeviceError`` otherwise."""
    if not isinstance(device_map, Mapping):
        raise DeviceError(
            f"device map must map name prefixes to devices, got {type(device_map).__name__}"
        )
    out: dict[str, str] = {}
    for key, v in device_map.items():
        if not isinstance(key, str):
            raise DeviceError(f"device map key {key!r} is not a string (a name prefix)")
        if v is None:
            raise DeviceError(
                f"device map [{key!r}] is None: None is not a device (leave the key out instead)"
            )
        out[key] = value(key, v)
    return out


def canonical_device_map(
    device_map: Mapping[object, object], *, current_cuda: Callable[[], int] | None = None
) -> dict[str, str]:
    """A device map with string keys and canonical device values; ``DeviceError`` otherwise."""
    return check_device_map(device_map, lambda _, v: canonical_device(v, current_cuda=current_cuda))


def device_for(name: str, device_map: Mapping[str, str] | None) -> str | None:
    """The device of ``name`` under a prefix map (longest dotted prefix wins, ``""`` is the
    default); ``None`` when no key covers the name or there is no map."""
    if not device_map:
        return None
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if not probe:
            return None
        cut = probe.rfind(".")
        probe = probe[:cut] if cut >= 0 else ""


class CudaApi(Protocol):
    """What these rules use of ``torch.cuda`` (passed in, so this module imports no torch)."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def current_device(self) -> int: ...


def check_cuda_visible(devices: Iterable[str], cuda: CudaApi, *, note: str = "") -> None:
    """``DeviceError`` unless every canonical ``cuda:N`` in ``devices`` is visible through
    ``cuda`` (``torch.cuda``); ``note`` is appended to the "not available" message."""
    wanted = [d for d in devices if d.startswith("cuda")]
    if not wanted:
        return
    if not cuda.is_available():
        raise DeviceError(
            f"cannot load to {wanted[0]}: CUDA is not available in this process{note}; "
            "use device='cpu'"
        )
    count = cuda.device_count()
    for d in wanted:
        if int(d.split(":", 1)[1]) >= count:
            raise DeviceError(f"cannot load to {d}: this process sees {count} CUDA device(s)")


def visible_device(value: object, cuda: CudaApi) -> str:
    """``canonical_device(value)`` checked against ``cuda`` (``torch.cuda``); bare ``"cuda"``
    is the current CUDA device."""
    current = cuda.current_device if cuda.is_available() else None
    device = canonical_device(value, current_cuda=current)
    check_cuda_visible([device], cuda)
    return device


__all__ = [
    "CudaApi",
    "canonical_device",
    "canonical_device_map",
    "check_cuda_visible",
    "check_device_map",
    "device_for",
    "visible_device",
]
