"""Mapping checkpoint tensor names onto the model's parameters and buffers.

A checkpoint saved from a model with or without its ``base_model_prefix`` (a head model loaded
from a base checkpoint, and the reverse) maps as transformers maps it; names transformers would
ignore are not reported as unexpected. Works from names and shapes only (the index), before any
byte is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastckpt.integrations.transformers.devices import device_for

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel

    from fastckpt.format.index import Index

__all__ = [
    "Report",
    "Slot",
    "checkpoint_device_map",
    "filter_missing",
    "keep_fp32_patterns",
    "keeps_fp32",
    "match_names",
    "model_slots",
]


@dataclass
class Slot:
    """One parameter or persistent buffer of the model, and where its tensor comes from."""

    name: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str | None = None


@dataclass
class Report:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    fallback_reason: str | None = None

    def as_loading_info(self) -> dict[str, Any]:
        return {
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "mismatched_keys": list(self.mismatched_keys),
            "error_msgs": [],
        }


def model_slots(model: torch.nn.Module) -> list[Slot]:
    slots: list[Slot] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        slots.append(Slot(name, True, tuple(param.shape), param.dtype))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for buf_name, buf in module._buffers.items():
            if buf is None or buf_name in module._non_persistent_buffers_set:
                continue
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            slots.append(Slot(full, False, tuple(buf.shape), buf.dtype))
    return slots


def _non_persistent_buffer_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for buf_name in module._non_persistent_buffers_set:
            names.add(f"{module_name}.{buf_name}" if module_name else buf_name)
    return names


def match_names(
    model: PreTrainedModel, slots: list[Slot], available: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Set ``slot.source`` for each slot found in ``available`` (name -> shape).

    Handles a checkpoint saved from a model with or without the ``base_model_prefix`` (a head
    model loaded from a base checkpoint and the reverse), as transformers does. Returns
    (missing, unexpected, mismatched) names.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    strip = add = False
    if prefix:
        dotted = prefix + "."
        ckpt_has = any(n.startswith(dotted) for n in available)
        model_has = any(s.name.startswith(dotted) for s in slots)
        strip = model_has and not ckpt_has
        add = ckpt_has and not model_has
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for slot in slots:
        if strip and slot.name.startswith(prefix + "."):
            candidate = slot.name[len(prefix) + 1 :]
        elif add:
            candidate = f"{prefix}.{slot.name}"
        else:
            candidate = slot.name
        shape = available.get(candidate)
        if shape is None:
            missing.append(slot.name)
            continue
        if tuple(shape) != slot.shape:
            mismatched.append(
                f"{candidate}: checkpoint shape {tuple(shape)}, model shape {slot.shape}"
            )
            continue
        slot.source = candidate
        used.add(candidate)
    unexpected = [n for n in available if n not in used]
    return missing, _filter_unexpected(model, unexpected), mismatched


def _filter_unexpected(model: PreTrainedModel, names: list[str]) -> list[str]:
    """Drop names transformers would silently ignore (declared patterns, old buffer names)."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    patterns += [r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"]
    non_persistent = _non_persistent_buffer_names(model)
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    return [n for n in names if n not in non_persistent and not regex.search(n)]


def filter_missing(model: PreTrainedModel, names: list[str]) -> list[str]:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    if not patterns:
        return names
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    return [n for n in names if not regex.search(n)]


def keep_fp32_patterns(model: PreTrainedModel, dtype: torch.dtype | None) -> list[str]:
    import torch

    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return patterns


def keeps_fp32(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    return any(p in parts or re.search(p.replace("*", ".*"), name) for p in patterns)


def checkpoint_device_map(
    index: Index, slots: list[Slot], device_map: Mapping[str, str]
) -> dict[str, str]:
    """The device map in checkpoint tensor names (they differ from the model's when a
    ``base_model_prefix`` is added or removed). Tensors the model does not use go to the CPU."""
    out: dict[str, str] = {}
    for slot in slots:
        if slot.source is not None:
            device = device_for(slot.name, device_map)
            if device is not None:
                out.setdefault(slot.source, device)
    for alias, target in index.aliases.items():
        if alias in out:
            out.setdefault(target, out[alias])
    for name in index.tensors:
        out.setdefault(name, "cpu")
    return out
