"""Devices and device maps for ``load_model``: canonical names, strategies, placement, dispatch."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.errors import DeviceError
from fastckpt.rules.devices import device_for, visible_device

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "MAP_STRATEGIES",
    "device_for",
    "dispatch",
    "normalize_device",
    "place_remaining_buffers",
    "resolve_devices",
]


# Device-map strategies that transformers resolves with accelerate.
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def normalize_device(value: Any) -> str:
    """One device as a canonical string (``"cpu"`` or ``"cuda:N"``), visible to this process
    (the rule of ``fastckpt.rules.devices``)."""
    import torch

    return visible_device(value, torch.cuda)


def resolve_devices(
    model: PreTrainedModel,
    device: Any,
    *,
    dtype: torch.dtype | None,
    max_memory: Mapping[Any, Any] | None,
) -> tuple[str | None, dict[str, str] | None]:
    """(single device, None) or (None, device map) with canonical device strings."""
    if isinstance(device, str) and device in MAP_STRATEGIES:
        device = _infer_device_map(model, device, dtype=dtype, max_memory=max_memory)
    elif max_memory is not None:
        raise ValueError("max_memory is only used with device='auto' / 'balanced' / 'sequential'")
    if isinstance(device, Mapping):
        if not device:
            raise DeviceError("the device map is empty")
        device_map: dict[str, str] = {}
        for key, value in device.items():
            if not isinstance(key, str):
                raise DeviceError(f"device map key {key!r}: expected a module name (str)")
            device_map[key] = normalize_device(value)
        _check_coverage(model, device_map)
        if len(set(device_map.values())) == 1:
            return next(iter(device_map.values())), None
        return None, device_map
    return normalize_device(device), None


def _infer_device_map(
    model: PreTrainedModel,
    strategy: str,
    *,
    dtype: torch.dtype | None,
    max_memory: Mapping[Any, Any] | None,
) -> dict[str, Any]:
    try:
        from accelerate.utils import get_balanced_memory, infer_auto_device_map
    except ImportError:
        raise DeviceError(
            f"device={strategy!r} needs accelerate (pip install accelerate); or pass a device"
        ) from None
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = dict(max_memory) if max_memory is not None else None
    with contextlib.suppress(Exception):
        model.tie_weights()  # so that tied parameters are counted once
    if strategy != "sequential":
        memory = get_balanced_memory(
            model,
            max_memory=memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=strategy == "balanced_low_0",
        )
    device_map = infer_auto_device_map(
        model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
    )
    if "disk" in device_map.values():
        raise DeviceError(
            f"device={strategy!r}: the model does not fit in GPU and CPU memory and fastckpt does "
            "not offload to disk"
        )
    return dict(device_map)


def _check_coverage(model: PreTrainedModel, device_map: Mapping[str, str]) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    for name in names:
        if device_for(name, device_map) is None:
            raise DeviceError(
                f"the device map places no module containing {name!r}; add a key for it (or '' for "
                "the whole model)"
            )


def place_remaining_buffers(
    model: PreTrainedModel, single: str | None, device_map: Mapping[str, str] | None
) -> None:
    """Move buffers that did not come from the checkpoint (computed on CPU) to their device."""
    import torch

    for module_name, module in model.named_modules():
        for buf_name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            want = single if device_map is None else device_for(full, device_map)
            if want is not None and buf.device != torch.device(want):
                module._buffers[buf_name] = buf.to(want)


def dispatch(model: PreTrainedModel, device_map: dict[str, str]) -> None:
    """Hooks that move activations between devices, as from_pretrained sets them up."""
    try:
        from accelerate import dispatch_model
    except ImportError:
        raise DeviceError(
            "a device map over several devices needs accelerate (pip install accelerate)"
        ) from None
    dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)  # type: ignore[assignment]
