"""peft integration: attach LoRA (and other peft) adapters loaded with ``fastckpt.load``.

``load_lora`` runs peft's own ``PeftModel.from_pretrained`` / ``PeftModel.load_adapter``, so the
adapter config handling, the key remapping (``set_peft_model_state_dict``), dtype autocasting,
device placement and eval/trainable state are exactly peft's. Only the step that reads the
adapter's weight file is served by ``fastckpt.load`` (for the adapter directory being loaded;
any other directory still goes through peft's reader). Where that gives the same adapter as
peft's default, the adapter's modules are created empty (peft's ``low_cpu_mem_usage=True``) and
the loaded tensors are assigned to them, so the adapter is neither randomly initialised nor
copied.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.rules.devices import visible_device

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from peft import PeftModel

__all__ = ["load_lora"]

ADAPTER_CONFIG_FILE = "adapter_config.json"

# Keyword arguments of PeftModel.from_pretrained / load_adapter that load_lora forwards.
_FORWARDED = frozenset(
    {"autocast_adapter_dtype", "ephemeral_gpu_offload", "ignore_mismatched_sizes"}
)

# peft reads adapter weights in the calling thread, so the directories being served are kept
# per thread; the stand-in reader is installed while any thread needs it.
_lock = threading.Lock()
_local = threading.local()
_installed = 0
_original_reader: Any = None


def _active() -> dict[str, tuple[Any, dict[str, Any]]]:
    """This thread's adapter directories being loaded: realpath -> (device, load options)."""
    active: dict[str, tuple[Any, dict[str, Any]]] | None = getattr(_local, "active", None)
    if active is None:
        active = _local.active = {}
    return active


def _redirecting_reader(
    model_id: Any,
    device: Any = None,
    key_mapping: Mapping[str, str] | None = None,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """Stands in for ``peft.peft_model.load_peft_weights`` while ``load_lora`` runs."""
    subfolder = hub_kwargs.get("subfolder")
    root = os.fspath(model_id) if isinstance(model_id, (str, os.PathLike)) else None
    if root is not None and subfolder:
        root = os.path.join(root, subfolder)
    entry = _active().get(os.path.realpath(root)) if root is not None else None
    if root is None or entry is None:
        if key_mapping is not None:  # (peft < 0.16 has no key_mapping)
            hub_kwargs["key_mapping"] = key_mapping
        out: dict[str, Any] = _original_reader(model_id, device=device, **hub_kwargs)
        return out
    import fastckpt

    wanted, options = entry
    weights = fastckpt.load(root, device=_canonical_device(wanted or device), **options)
    return _remap(dict(weights), key_mapping)


def _remap(weights: dict[str, Any], key_mapping: Mapping[str, str] | None) -> dict[str, Any]:
    """Apply peft's ``key_mapping`` rule: drop the peft prefix, first matching pattern, re-add."""
    if not key_mapping:
        return weights
    out: dict[str, Any] = {}
    for key, value in weights.items():
        if key.startswith("base_model.model."):
            prefix = "base_model.model."
        elif key.startswith("base_model."):
            prefix = "base_model."
        else:
            raise ValueError(f"adapter tensor {key!r} has no 'base_model.' prefix; cannot remap it")
        name = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                name = renamed
                break
        out[prefix + name] = value
    return out


def _canonical_device(device: Any) -> str:
    """``"cpu"`` (also for ``None``) or a visible ``"cuda:N"``."""
    import torch

    if device is None:
        return "cpu"
    return visible_device(device, torch.cuda)


@contextlib.contextmanager
def _serve_from_fastckpt(root: str, device: Any, options: dict[str, Any]) -> Iterator[None]:
    """Within the block, peft reads ``root``'s adapter weights with ``fastckpt.load``."""
    global _installed, _original_reader
    import peft.peft_model as peft_model

    key = os.path.realpath(root)
    active = _active()
    previous = active.get(key)
    with _lock:
        if _installed == 0:
            # (kept after uninstalling: a call already inside the stand-in still needs it)
            _original_reader = peft_model.load_peft_weights
            peft_model.load_peft_weights = _redirecting_reader
        _installed += 1
    active[key] = (device, options)
    try:
        yield
    finally:
        if previous is None:
            del active[key]
        else:
            active[key] = previous
        with _lock:
            _installed -= 1
            if _installed == 0:
                peft_model.load_peft_weights = _original_reader


def _base_float_dtypes(model: torch.nn.Module, adapter_names: set[str]) -> set[torch.dtype]:
    """Dtypes of the base model's floating parameters (adapters' own parameters skipped)."""
    dtypes = set()
    for name, param in model.named_parameters():
        if adapter_names and set(name.split(".")) & adapter_names:
            continue
        if param.is_floating_point():
            dtypes.add(param.dtype)
    return dtypes


def _assign_is_exact(root: str, base_dtypes: set[torch.dtype]) -> bool:
    """Whether peft's ``low_cpu_mem_usage`` path gives the same adapter values as its default.

    That path first casts the loaded adapter to the dtype of the layer it wraps (then autocasts
    it), which rounds an adapter stored with more precision than the base model; the default
    path copies the stored values into adapter weights created in full precision. They agree
    when the adapter is stored in the base model's (single) floating dtype.
    """
    import fastckpt
    from fastckpt.format.dtypes import torch_dtype

    if len(base_dtypes) != 1:
        return False
    index = fastckpt.read_index(root)
    stored = {torch_dtype(e.dtype) for e in index.tensors.values()}
    stored = {d for d in stored if d.is_floating_point}
    return stored <= base_dtypes


def _single_device(model: torch.nn.Module) -> str | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) != 1:
        return None
    return _canonical_device(next(iter(devices)))


def load_lora(
    model: Any,
    adapter_path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    device: Any = None,
    low_cpu_mem_usage: bool | None = None,
    verify: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Attach a peft adapter (converted to fastckpt) to ``model`` with ``PeftModel`` semantics.

    Args:
        model: a transformers model (a new ``PeftModel`` is returned, as
            ``PeftModel.from_pretrained(model, adapter_path, adapter_name=...)`` would), or a
            ``PeftModel`` (the adapter is added to it, as ``model.load_adapter(...)`` would; it is
            not made active: call ``model.set_adapter(adapter_name)``).
        adapter_path: a fastckpt checkpoint converted from a peft adapter directory (its
            ``adapter_config.json`` is carried), or a stock peft adapter directory with
            safetensors weights.
        adapter_name: the adapter's name in the model.
        is_trainable: load the adapter for training (else frozen, model in eval mode).
        device: where to load the adapter weights; default: the device of ``model``'s
            parameters when they are all on one device, else peft's default.
        low_cpu_mem_usage: ``True``: peft creates the adapter's modules empty and assigns the
            loaded tensors (no random initialisation, no copy; peft then casts them to the
            wrapped layers' dtype). ``False``: peft's default (initialise, then copy).
            ``None`` (default): ``True`` when that gives bitwise the same adapter as peft's
            default, i.e. the adapter is stored in the base model's dtype, else ``False``.
        verify: verify checksums while loading.
        **kwargs: ``autocast_adapter_dtype``, ``ephemeral_gpu_offload``,
            ``ignore_mismatched_sizes``, passed to peft.

    Returns:
        The ``PeftModel``.
    """
    import torch
    from peft import PeftModel

    if isinstance(adapter_path, torch.nn.Module) and isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "load_lora(model, adapter_path): the model comes first, then the adapter's path "
            f"(got the path {os.fspath(model)!r} first)"
        )
    if not isinstance(adapter_path, (str, os.PathLike)):
        raise TypeError(
            f"adapter_path: expected the path of an adapter directory, got {adapter_path!r}"
        )
    root = os.fspath(adapter_path)
    if os.path.isfile(root):
        raise NotADirectoryError(
            errno.ENOTDIR,
            "a file, not an adapter directory: give the directory that holds "
            f"{ADAPTER_CONFIG_FILE} and the weights ({os.path.dirname(os.path.abspath(root))}?)",
            root,
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "adapter directory not found", root)
    if not os.path.isfile(os.path.join(root, ADAPTER_CONFIG_FILE)):
        raise FileNotFoundError(
            errno.ENOENT,
            f"not a peft adapter: no {ADAPTER_CONFIG_FILE} (convert the peft adapter directory; "
            "its config is carried)",
            os.path.join(root, ADAPTER_CONFIG_FILE),
        )
    unknown = sorted(set(kwargs) - _FORWARDED)
    if unknown:
        raise TypeError(
            f"load_lora() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"supported: {', '.join(sorted(_FORWARDED))}"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {model!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r}: expected a non-empty string")
    existing: PeftModel | None = model if isinstance(model, PeftModel) else None
    names: set[str] = set(existing.peft_config) if existing is not None else set()
    if adapter_name in names:
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; choose another "
            "adapter_name (or delete_adapter first)"
        )
    wanted = _canonical_device(device) if device is not None else _single_device(model)
    options: dict[str, Any] = {"verify": True} if verify else {}
    call: dict[str, Any] = dict(kwargs)
    method: Any = existing.load_adapter if existing is not None else PeftModel.from_pretrained
    if "low_cpu_mem_usage" in inspect.signature(method).parameters:
        if low_cpu_mem_usage is None:
            low_cpu_mem_usage = _assign_is_exact(root, _base_float_dtypes(model, names))
        call["low_cpu_mem_usage"] = bool(low_cpu_mem_usage)
    elif low_cpu_mem_usage:
        raise TypeError("low_cpu_mem_usage=True needs peft >= 0.13")
    if wanted is not None:
        call["torch_device"] = wanted
    with _serve_from_fastckpt(root, wanted, options):
        if existing is not None:
            existing.load_adapter(root, adapter_name, is_trainable=is_trainable, **call)
            return existing
        return PeftModel.from_pretrained(
            model, root, adapter_name=adapter_name, is_trainable=is_trainable, **call
        )
