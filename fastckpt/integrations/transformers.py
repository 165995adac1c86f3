"""transformers integration: ``load_model`` and the ``from_pretrained`` drop-in.

``load_model(path)`` builds a transformers model from a checkpoint directory that holds a
``config.json`` (a fastckpt checkpoint converted from a transformers model directory, or a stock
safetensors model directory) with every parameter and buffer coming from ``fastckpt.load``:

1. The skeleton is built from the config with every parameter on the ``meta`` device: nothing is
   allocated or initialised for weights. Buffers are computed on the CPU as the model's
   ``__init__`` defines them (rotary ``inv_freq``, position ids, ...), exactly as transformers
   computes them, because they are small and often absent from checkpoints.
2. The checkpoint is loaded once with ``fastckpt.load`` (one storage per partition, on the target
   device or devices) and each tensor becomes the model's parameter or buffer as is: no second
   copy. Only a requested ``dtype`` different from the stored one makes a (cast) copy.
3. Tied weights are tied by the model's own ``tie_weights()`` (a checkpoint that omits
   ``lm_head.weight`` because it is tied works), buffers absent from the checkpoint are moved
   to their device, the model is put in eval mode, and no tensor may remain on ``meta``.

When the checkpoint's names do not map one to one onto the model (weights that the installed
transformers renames or fuses at load time, parameters missing from the checkpoint such as a new
classification head), the tensors already loaded by fastckpt are handed to transformers' own
``from_pretrained(None, config=..., state_dict=...)``, so the result is what transformers would
build (it may copy tensors; a warning says so).

``enable()`` / ``disable()`` / ``enabled()`` patch ``PreTrainedModel.from_pretrained`` so that
every concrete and Auto model class loads a local fastckpt checkpoint through ``load_model``;
every other path goes to the original method untouched.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastckpt.errors import DeviceError, FormatError
from fastckpt.rules.devices import device_for as _device_for
from fastckpt.rules.devices import visible_device

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from fastckpt.format.index import Index

__all__ = [
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "is_fastckpt_checkpoint",
    "load_model",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "fastckpt.index"  # FORMAT.md section 1 (fastckpt.format.spec.INDEX_FILE)
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# Device-map strategies that transformers resolves with accelerate.
_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".", 1)[0])


def is_fastckpt_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory holding a fastckpt index."""
    try:
        root = os.fspath(path)
    except TypeError:
        return False
    return os.path.isdir(root) and os.path.isfile(os.path.join(root, INDEX_FILE))


# --------------------------------------------------------------------------------------------
# dtypes and devices
# --------------------------------------------------------------------------------------------


def _as_dtype(value: Any, *, what: str = "dtype") -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``)."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(
        f"{what}={value!r}: expected None, 'auto', a torch.dtype or its name (e.g. 'bfloat16')"
    )


def _config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config records (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    attr = "dtype" if _transformers_major() >= 5 else "torch_dtype"
    try:
        return _as_dtype(getattr(config, attr, None))
    except ValueError:
        return None


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    setattr(config, "dtype" if _transformers_major() >= 5 else "torch_dtype", dtype)


def _normalize_device(value: Any) -> str:
    """One device as a canonical string (``"cpu"`` or ``"cuda:N"``), visible to this process."""
    import torch

    return visible_device(value, torch.cuda)


# --------------------------------------------------------------------------------------------
# building the skeleton
# --------------------------------------------------------------------------------------------

_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter registered on any module moves to ``meta`` at once.

    The tensor a module's ``__init__`` allocates for a parameter (``torch.empty``, untouched, so
    its pages are never faulted in) is dropped at registration, so any initialisation that runs
    afterwards (``reset_parameters``, ``post_init``) works on meta tensors and costs nothing.
    Buffers are left alone: they are computed on the CPU as the module defines them.
    The patch is process-wide while the block runs (modules built concurrently by other threads
    are affected too); fastckpt's own builds are serialised by a lock.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register_parameter(self: torch.nn.Module, name: str, param: Any) -> None:
        original(self, name, param)
        if param is None or param.device.type == "meta":
            return
        meta = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        for key, value in vars(param).items():
            setattr(meta, key, value)
        self._parameters[name] = meta

    with _BUILD_LOCK:
        torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _is_auto_class(cls: Any) -> bool:
    return isinstance(cls, type) and getattr(cls, "_model_mapping", None) is not None


def _resolve_model_class(
    config: PretrainedConfig, model_class: Any, *, trust_remote_code: bool, path: str
) -> type[PreTrainedModel]:
    import transformers
    from transformers import PreTrainedModel

    cls: Any = model_class
    if isinstance(cls, str):
        found = getattr(transformers, cls, None)
        if found is None:
            raise ValueError(f"model_class={cls!r} is not a class exported by transformers")
        cls = found
    if cls is None:
        architectures = getattr(config, "architectures", None) or []
        name = architectures[0] if architectures else None
        found = getattr(transformers, name, None) if isinstance(name, str) else None
        cls = found if isinstance(found, type) else transformers.AutoModelForCausalLM
    if _is_auto_class(cls):
        auto_map = getattr(config, "auto_map", None) or {}
        if cls.__name__ in auto_map:
            if not trust_remote_code:
                raise ValueError(
                    f"the checkpoint's config maps {cls.__name__} to custom code "
                    f"({auto_map[cls.__name__]!r}); pass trust_remote_code=True to run it"
                )
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            cls = get_class_from_dynamic_module(auto_map[cls.__name__], path)
        else:
            try:
                from transformers.models.auto.auto_factory import _get_model_class

                cls = _get_model_class(config, cls._model_mapping)
            except (KeyError, ImportError):
                raise ValueError(
                    f"{cls.__name__} has no model class for model_type "
                    f"{getattr(config, 'model_type', None)!r}; pass model_class= explicitly"
                ) from None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(
            f"model_class={model_class!r}: expected a transformers PreTrainedModel subclass, an "
            "Auto class (e.g. AutoModelForCausalLM) or the name of one"
        )
    return cls


def _init_parameter_names(cls: type) -> set[str] | None:
    """Keyword names a model's ``__init__`` accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "config"}


def _build_skeleton(
    cls: type[PreTrainedModel],
    config: PretrainedConfig,
    build_dtype: torch.dtype,
    init_kwargs: Mapping[str, Any],
) -> PreTrainedModel:
    """The model with parameters on meta and buffers computed on the CPU under ``build_dtype``."""
    import torch

    kwargs = dict(init_kwargs)
    # transformers builds under the target dtype as the default dtype; buffers created with the
    # default dtype must come out the same.
    kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = build_dtype
    previous = torch.get_default_dtype()
    with _parameters_on_meta(), _no_weight_init():
        try:
            model = cls._from_config(config, **kwargs)
        finally:
            torch.set_default_dtype(previous)
    if _transformers_major() >= 5:
        _initialise_buffers(model)
    return model


def _no_weight_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that skips weight initialisation (every weight is loaded anyway).

    Initialising meta tensors allocates nothing but still costs a few ms per tensor.
    """
    import importlib

    # transformers >= 5 keeps it in transformers.initialization, 4.x in modeling_utils
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError):
            switch = getattr(importlib.import_module(module), "no_init_weights", None)
            if switch is not None:
                return switch()
    return contextlib.nullcontext()  # pragma: no cover


def _initialise_buffers(model: PreTrainedModel) -> None:
    """Give buffers the values transformers >= 5 gives them in from_pretrained.

    transformers 5 builds models on the meta device and computes buffers (rotary frequencies,
    position ids, ...) in each model's ``_init_weights``; ``__init__`` usually computes the
    same values, but not always. Run ``_init_weights`` of the owning (sub-)model on each module
    that holds buffers (a handful of modules; their parameters are still on meta, so this
    costs nothing for them).
    """
    import torch
    from transformers import PreTrainedModel

    owners: list[tuple[Any, torch.nn.Module]] = []

    def walk(module: torch.nn.Module, owner: Any) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        if any(b is not None for b in module._buffers.values()):
            owners.append((owner, module))
        for child in module.children():
            walk(child, owner)

    walk(model, model)
    with torch.no_grad():
        for owner, module in owners:
            try:
                owner._init_weights(module)
            except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel
                logger.debug("_init_weights(%s) skipped: %s", type(module).__name__, exc)


# --------------------------------------------------------------------------------------------
# mapping checkpoint names onto the model
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One parameter or persistent buffer of the model, and where its tensor comes from."""

    name: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str | None = None


@dataclass
class _Report:
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


def _model_slots(model: torch.nn.Module) -> list[_Slot]:
    slots: list[_Slot] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        slots.append(_Slot(name, True, tuple(param.shape), param.dtype))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for buf_name, buf in module._buffers.items():
            if buf is None or buf_name in module._non_persistent_buffers_set:
                continue
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            slots.append(_Slot(full, False, tuple(buf.shape), buf.dtype))
    return slots


def _non_persistent_buffer_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for buf_name in module._non_persistent_buffers_set:
            names.add(f"{module_name}.{buf_name}" if module_name else buf_name)
    return names


def _match(
    model: PreTrainedModel, slots: list[_Slot], available: Mapping[str, tuple[int, ...]]
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


def _filter_missing(model: PreTrainedModel, names: list[str]) -> list[str]:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    if not patterns:
        return names
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    return [n for n in names if not regex.search(n)]


def _keep_fp32_patterns(model: PreTrainedModel, dtype: torch.dtype | None) -> list[str]:
    import torch

    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return patterns


def _keeps_fp32(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    return any(p in parts or re.search(p.replace("*", ".*"), name) for p in patterns)


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def _read_config(
    path: str, *, trust_remote_code: bool, overrides: dict[str, Any]
) -> tuple[PretrainedConfig, dict[str, Any]]:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        hint = (
            "it is a peft adapter: load the base model, then fastckpt.load_lora(model, path)"
            if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE))
            else "convert the transformers model directory (its config.json is carried) or pass "
            "config="
        )
        raise FileNotFoundError(
            errno.ENOENT,
            f"checkpoint has no {CONFIG_FILE}; {hint}",
            os.path.join(path, CONFIG_FILE),
        )
    config, unused = AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, return_unused_kwargs=True, **overrides
    )
    return config, dict(unused)


def _peek_index(path: str) -> Index | None:
    """The checkpoint's index without loading data."""
    import fastckpt

    return fastckpt.read_index(path)


def _load_tensors(path: str, device: str | dict[str, str], load_options: dict[str, Any]) -> Any:
    import fastckpt

    return fastckpt.load(path, device=device, **load_options)


def _first_float_dtype(index: Index | None) -> torch.dtype | None:
    if index is None:
        return None
    for entry in index.tensors.values():
        if entry.dtype in ("float16", "bfloat16", "float32", "float64"):
            return _as_dtype(entry.dtype)
    return None


def _resolve_devices(
    model: PreTrainedModel,
    device: Any,
    *,
    dtype: torch.dtype | None,
    max_memory: Mapping[Any, Any] | None,
) -> tuple[str | None, dict[str, str] | None]:
    """(single device, None) or (None, device map) with canonical device strings."""
    if isinstance(device, str) and device in _MAP_STRATEGIES:
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
            device_map[key] = _normalize_device(value)
        _check_coverage(model, device_map)
        if len(set(device_map.values())) == 1:
            return next(iter(device_map.values())), None
        return None, device_map
    return _normalize_device(device), None


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


def _checkpoint_device_map(
    index: Index, slots: list[_Slot], device_map: Mapping[str, str]
) -> dict[str, str]:
    """The device map in checkpoint tensor names (they differ from the model's when a
    ``base_model_prefix`` is added or removed). Tensors the model does not use go to the CPU."""
    out: dict[str, str] = {}
    for slot in slots:
        if slot.source is not None:
            device = _device_for(slot.name, device_map)
            if device is not None:
                out.setdefault(slot.source, device)
    for alias, target in index.aliases.items():
        if alias in out:
            out.setdefault(target, out[alias])
    for name in index.tensors:
        out.setdefault(name, "cpu")
    return out


def _check_coverage(model: PreTrainedModel, device_map: Mapping[str, str]) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    for name in names:
        if _device_for(name, device_map) is None:
            raise DeviceError(
                f"the device map places no module containing {name!r}; add a key for it (or '' for "
                "the whole model)"
            )


def load_model(
    path: str | os.PathLike[str],
    *,
    device: Any = "cpu",
    dtype: Any = None,
    model_class: Any = None,
    trust_remote_code: bool = False,
    config: PretrainedConfig | None = None,
    verify: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Build a transformers model from a checkpoint directory, weights via ``fastckpt.load``.

    Args:
        path: a fastckpt checkpoint converted from a transformers model directory (or a stock
            safetensors model directory); its ``config.json`` (and ``generation_config.json``)
            describe the model.
        device: ``"cpu"``, ``"cuda:N"`` (``"cuda"``, an int, a ``torch.device``), a
            transformers-style device map ``{module_name: device}``, or ``"auto"`` /
            ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` (resolved with accelerate;
            disk offload is refused).
        dtype: ``None`` keeps every tensor as stored (no copy); a ``torch.dtype`` (or its name)
            casts floating tensors as transformers does (modules the model keeps in float32 stay
            float32); ``"auto"`` means the dtype the config records.
        model_class: a ``PreTrainedModel`` subclass, an Auto class or the name of either. Default:
            ``config.architectures[0]`` from transformers, else ``AutoModelForCausalLM``.
        trust_remote_code: allow custom model code named by the config's ``auto_map``.
        config: a config to use instead of the checkpoint's ``config.json``.
        verify: verify checksums while loading (``fastckpt.load(verify=True)``).
        **kwargs: ``attn_implementation``, ``max_memory`` (with a device-map strategy), config
            attribute overrides (as ``from_pretrained`` accepts them when no ``config`` is given),
            and keyword arguments of the model's ``__init__``.

    Returns:
        The model in eval mode; its parameters are views of the storage ``fastckpt.load`` filled.

    Raises:
        FileNotFoundError: no ``config.json`` (e.g. the path is a peft adapter).
        DeviceError: an unusable device or device map.
        FormatError: a checkpoint tensor's shape differs from the model's.
        ValueError, TypeError: unsupported options (quantized checkpoints, unknown kwargs, ...).
    """
    model, _ = _load_model(
        path,
        device=device,
        dtype=dtype,
        model_class=model_class,
        trust_remote_code=trust_remote_code,
        config=config,
        verify=verify,
        kwargs=kwargs,
    )
    return model


def _load_model(
    path: str | os.PathLike[str],
    *,
    device: Any,
    dtype: Any,
    model_class: Any,
    trust_remote_code: bool,
    config: PretrainedConfig | None,
    verify: bool,
    kwargs: dict[str, Any],
    generation_config: Any = None,
) -> tuple[PreTrainedModel, _Report]:
    import copy

    import torch
    from transformers import PretrainedConfig

    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "checkpoint directory not found", root)
    kwargs = dict(kwargs)
    attn_implementation = kwargs.pop("attn_implementation", None)
    max_memory = kwargs.pop("max_memory", None)
    if config is None:
        config, init_kwargs = _read_config(
            root, trust_remote_code=trust_remote_code, overrides=kwargs
        )
    elif isinstance(config, PretrainedConfig):
        config = copy.deepcopy(config)
        init_kwargs = kwargs
    else:
        raise TypeError(f"config={config!r}: expected a transformers PretrainedConfig or None")
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            "the checkpoint's config has a quantization_config: pre-quantized checkpoints are not "
            "supported by fastckpt.load_model; use from_pretrained on the source directory"
        )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    cls = _resolve_model_class(config, model_class, trust_remote_code=trust_remote_code, path=root)
    accepted = _init_parameter_names(cls)
    if accepted is not None:
        unknown = sorted(set(init_kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"load_model() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
                f"neither config attributes nor arguments of {cls.__name__}.__init__"
            )

    if isinstance(dtype, str) and dtype == "auto":
        target = _config_dtype(config)
    else:
        target = _as_dtype(dtype)
    index = _peek_index(root)
    build_dtype = target or _config_dtype(config) or _first_float_dtype(index) or torch.float32
    if not build_dtype.is_floating_point or build_dtype.itemsize < 2:
        build_dtype = torch.float32
    pristine_config = copy.deepcopy(config)
    model = _build_skeleton(cls, config, build_dtype, init_kwargs)

    single, device_map = _resolve_devices(model, device, dtype=target, max_memory=max_memory)

    slots = _model_slots(model)
    target_devices: str | dict[str, str]
    if device_map is None:
        assert single is not None
        target_devices = single
    else:
        target_devices = device_map
    if index is not None:
        shapes = {name: index.entry(name).shape for name in index.names()}
        _, _, mismatched = _match(model, slots, shapes)
        if mismatched:
            raise _mismatch_error(cls, mismatched, root)
        if device_map is not None:
            target_devices = _checkpoint_device_map(index, slots, device_map)

    load_options: dict[str, Any] = {"verify": True} if verify else {}
    state = _load_tensors(root, target_devices, load_options)

    missing, unexpected, mismatched = _match(
        model, slots, {name: tuple(t.shape) for name, t in state.items()}
    )
    if mismatched:
        raise _mismatch_error(cls, mismatched, root)
    report = _Report(unexpected_keys=unexpected)
    _assign(model, slots, state, target)

    _tie(model, missing)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    unresolved = _filter_missing(model, [n for n in missing if n in still_meta])
    if still_meta:
        reason = (
            f"{len(still_meta)} parameter(s) of {cls.__name__} have no tensor of the same name in "
            f"the checkpoint (e.g. {still_meta[0]!r})"
        )
        logger.warning(
            "fastckpt.load_model(%r): %s; handing the loaded tensors to transformers' own loader "
            "(renamed, fused or newly initialised weights; tensors may be copied)",
            root,
            reason,
        )
        del model
        model = _fallback(
            cls,
            pristine_config,
            state,
            init_kwargs,
            dtype=target or _first_float_dtype(index) or _state_dtype(state),
            device=device_map if device_map is not None else single,
        )
        report = _Report(missing_keys=unresolved, fallback_reason=reason)
    else:
        _place_remaining_buffers(model, single, device_map)
        _set_config_dtype(model.config, target or build_dtype)
    if device_map is None or report.fallback_reason is None:
        # (accelerate legitimately leaves offloaded weights on meta after dispatching a map)
        _check_materialised(model, root)
    if device_map is not None and report.fallback_reason is None:
        _dispatch(model, device_map)
    model.config.name_or_path = root
    _load_generation_config(model, root, generation_config)
    model.eval()
    return model, report


def _mismatch_error(cls: type, mismatched: list[str], root: str) -> FormatError:
    return FormatError(
        f"{len(mismatched)} checkpoint tensor(s) do not fit {cls.__name__} (wrong config?): "
        + "; ".join(mismatched[:5]),
        path=root,
    )


def _assign(
    model: PreTrainedModel,
    slots: list[_Slot],
    state: Mapping[str, torch.Tensor],
    target: torch.dtype | None,
) -> None:
    """Make each matched slot's tensor the model's parameter or buffer (cast only if asked).

    A tensor the checkpoint stores once under several names (an alias) becomes one Parameter.
    With a target dtype, floating tensors take the dtype of the skeleton's slot (built under
    the target dtype), float32 for modules the model keeps in float32, as transformers does.
    """
    import torch

    patterns = _keep_fp32_patterns(model, target)
    converted: dict[int, torch.Tensor] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for slot in slots:
        if slot.source is None:
            continue
        tensor = state[slot.source]
        if target is not None and tensor.is_floating_point():
            want = torch.float32 if _keeps_fp32(slot.name, patterns) else slot.dtype
            if want.is_floating_point and tensor.dtype != want:
                if id(tensor) not in converted:
                    converted[id(tensor)] = tensor.to(want)
                tensor = converted[id(tensor)]
        module_name, _, attr = slot.name.rpartition(".")
        module = model.get_submodule(module_name)
        if not slot.is_param:
            module._buffers[attr] = tensor
            continue
        param = params.get(id(tensor))
        if param is None:
            old = module._parameters[attr]
            grad = bool(tensor.is_floating_point() or tensor.is_complex())
            param = (type(old) if old is not None else torch.nn.Parameter)(tensor, grad)
            params[id(tensor)] = param
        module._parameters[attr] = param


def _tie(model: PreTrainedModel, missing: list[str]) -> None:
    """The model's own tying. transformers >= 5 takes the names missing from the checkpoint
    (it ties towards the weight that is present, and leaves alone tied weights that the
    checkpoint stores with different values); 4.x ties unconditionally."""
    if "missing_keys" in inspect.signature(model.tie_weights).parameters:
        model.tie_weights(missing_keys=set(missing))
    else:
        model.tie_weights()


def _check_materialised(model: PreTrainedModel, root: str) -> None:
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise FormatError(
            f"{len(leftover)} tensor(s) of {type(model).__name__} were neither loaded nor "
            f"initialised (still on the meta device): {', '.join(leftover[:5])}",
            path=root,
            tensor=leftover[0],
        )


def _state_dtype(state: Mapping[str, Any]) -> torch.dtype | None:
    for tensor in state.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _place_remaining_buffers(
    model: PreTrainedModel, single: str | None, device_map: Mapping[str, str] | None
) -> None:
    """Move buffers that did not come from the checkpoint (computed on CPU) to their device."""
    import torch

    for module_name, module in model.named_modules():
        for buf_name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            want = single if device_map is None else _device_for(full, device_map)
            if want is not None and buf.device != torch.device(want):
                module._buffers[buf_name] = buf.to(want)


def _dispatch(model: PreTrainedModel, device_map: dict[str, str]) -> None:
    """Hooks that move activations between devices, as from_pretrained sets them up."""
    try:
        from accelerate import dispatch_model
    except ImportError:
        raise DeviceError(
            "a device map over several devices needs accelerate (pip install accelerate)"
        ) from None
    dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)  # type: ignore[assignment]


def _fallback(
    cls: type[PreTrainedModel],
    config: PretrainedConfig,
    state: Mapping[str, Any],
    init_kwargs: Mapping[str, Any],
    *,
    dtype: torch.dtype | None,
    device: str | dict[str, str] | None,
) -> PreTrainedModel:
    """transformers' own loading of a state dict that fastckpt has loaded already."""
    import torch

    kwargs: dict[str, Any] = dict(init_kwargs)
    if _transformers_major() >= 5:
        return cls.from_pretrained(
            None, config=config, state_dict=dict(state), device_map=device, dtype=dtype, **kwargs
        )
    # transformers 4.x re-reads weight files when low_cpu_mem_usage / device_map are given, so
    # it builds the model on the CPU, copies the state dict in, and the model is moved after.
    model: Any = cls.from_pretrained(
        None, config=config, state_dict=dict(state), torch_dtype=dtype, **kwargs
    )
    if isinstance(device, dict):
        _dispatch(model, device)
    elif device is not None and device != "cpu":
        model = model.to(torch.device(device))
    return model


def _load_generation_config(model: PreTrainedModel, root: str, given: Any) -> None:
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return
    if given is not None:
        model.generation_config = given
        return
    if os.path.isfile(os.path.join(root, GENERATION_CONFIG_FILE)):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)


# --------------------------------------------------------------------------------------------
# the from_pretrained drop-in
# --------------------------------------------------------------------------------------------

_PATCH_LOCK = threading.Lock()
_original: Any = None  # the classmethod object replaced by enable()

# from_pretrained kwargs that change nothing for a local fastckpt checkpoint.
_IGNORED = frozenset(
    {
        "low_cpu_mem_usage",
        "_fast_init",
        "use_safetensors",
        "weights_only",
        "local_files_only",
        "cache_dir",
        "force_download",
        "resume_download",
        "proxies",
        "token",
        "use_auth_token",
        "revision",
        "code_revision",
        "mirror",
        "_from_auto",
        "_from_pipeline",
        "_commit_hash",
        "tqdm_class",
        "disable_mmap",
        "offload_state_dict",
    }
)

# from_pretrained kwargs that fastckpt does not support when set to something other than these.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "quantization_config": (None, "quantization is not supported by the fastckpt loader"),
    "state_dict": (None, "pass a path or a state_dict, not both"),
    "gguf_file": (None, "GGUF files are not fastckpt checkpoints"),
    "variant": (None, "fastckpt checkpoints have no weight variants"),
    "offload_folder": (None, "disk offload is not supported"),
    "offload_buffers": (False, "offload is not supported"),
    "device_mesh": (None, "tensor parallelism is not supported"),
    "tp_plan": (None, "tensor parallelism is not supported"),
    "tp_size": (None, "tensor parallelism is not supported"),
    "distributed_config": (None, "distributed loading is not supported"),
    "key_mapping": (None, "key_mapping is not supported"),
    "use_kernels": (False, "hub kernels are not supported"),
    "kernel_config": (None, "hub kernels are not supported"),
    "ignore_mismatched_sizes": (False, "mismatched sizes are refused"),
    "fusion_config": (None, "fusion_config is not supported"),
    "from_tf": (False, "TensorFlow checkpoints are not fastckpt checkpoints"),
    "from_flax": (False, "Flax checkpoints are not fastckpt checkpoints"),
}


def _local_checkpoint(name_or_path: Any, subfolder: Any) -> str | None:
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    root = os.fspath(name_or_path)
    if isinstance(subfolder, str) and subfolder:
        root = os.path.join(root, subfolder)
    return root if is_fastckpt_checkpoint(root) else None


def _from_pretrained(
    cls: type[PreTrainedModel], root: str, model_args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``cls.from_pretrained(root, ...)`` for a local fastckpt checkpoint."""
    import torch

    if model_args:
        raise TypeError(
            "from_pretrained(): positional model arguments are not supported for fastckpt "
            "checkpoints; pass keyword arguments"
        )
    kwargs = dict(kwargs)
    for name, (allowed, why) in _UNSUPPORTED.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value is not allowed and value != allowed:
                raise ValueError(f"from_pretrained({name}=...) with a fastckpt checkpoint: {why}")
    for name in _IGNORED:
        kwargs.pop(name, None)
    kwargs.pop("subfolder", None)
    adapter_kwargs = kwargs.pop("adapter_kwargs", None) or {}
    if "_adapter_model_path" in adapter_kwargs:
        raise ValueError(
            "loading a peft adapter through from_pretrained is not supported for fastckpt "
            "checkpoints; load the base model, then fastckpt.load_lora(model, adapter_path)"
        )
    kwargs.pop("adapter_name", None)
    trust_remote_code = bool(kwargs.pop("trust_remote_code", None) or False)
    output_loading_info = bool(kwargs.pop("output_loading_info", False))
    generation_config = kwargs.pop("generation_config", None)
    config = kwargs.pop("config", None)
    device_map = kwargs.pop("device_map", None)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if dtype is None:
        dtype = torch_dtype
    if isinstance(dtype, Mapping):
        raise ValueError("a dtype per sub-model (dict) is not supported for fastckpt checkpoints")
    if dtype is None:
        # What the installed transformers does by default: 5.x keeps the config's dtype,
        # 4.x loads in torch's default dtype (float32).
        dtype = "auto" if _transformers_major() >= 5 else torch.get_default_dtype()
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config, kwargs = AutoConfig.from_pretrained(
            config, trust_remote_code=trust_remote_code, return_unused_kwargs=True, **kwargs
        )
    model, report = _load_model(
        root,
        device="cpu" if device_map is None else device_map,
        dtype=dtype,
        model_class=cls,
        trust_remote_code=trust_remote_code,
        config=config,
        verify=False,
        kwargs=kwargs,
        generation_config=generation_config,
    )
    if output_loading_info:
        return model, report.as_loading_info()
    return model


def enable() -> None:
    """Route ``from_pretrained`` of every transformers model class through fastckpt.

    After this, ``AutoModelForCausalLM.from_pretrained(path, ...)`` (any Auto or concrete class)
    loads a local fastckpt checkpoint (a directory with ``fastckpt.index``) with
    :func:`load_model`, honouring ``device_map`` (a device, a device map or ``"auto"``),
    ``torch_dtype`` / ``dtype``, ``attn_implementation`` and config overrides; it accepts
    ``low_cpu_mem_usage`` and hub options (which change nothing for a local directory) and raises
    ``ValueError`` for options it does not support (``quantization_config``, offloading, tensor
    parallelism, ...). Any other path goes to the original ``from_pretrained``. Calling it twice
    is harmless.
    """
    global _original
    from transformers import PreTrainedModel

    with _PATCH_LOCK:
        if _original is not None:
            return
        original = PreTrainedModel.__dict__["from_pretrained"]
        original_func: Callable[..., Any] = original.__func__

        @functools.wraps(original_func)
        def from_pretrained(
            cls: type[PreTrainedModel], pretrained_model_name_or_path: Any, *args: Any, **kw: Any
        ) -> Any:
            root = _local_checkpoint(pretrained_model_name_or_path, kw.get("subfolder"))
            if root is None:
                return original_func(cls, pretrained_model_name_or_path, *args, **kw)
            return _from_pretrained(cls, root, args, kw)

        from_pretrained.__fastckpt_patch__ = True  # type: ignore[attr-defined]
        PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment,method-assign]
        _original = original


def disable() -> None:
    """Restore the original ``PreTrainedModel.from_pretrained`` (no-op when not enabled)."""
    global _original
    from transformers import PreTrainedModel

    with _PATCH_LOCK:
        if _original is None:
            return
        current = PreTrainedModel.__dict__.get("from_pretrained")
        func = getattr(current, "__func__", None)
        if not getattr(func, "__fastckpt_patch__", False):
            raise RuntimeError(
                "PreTrainedModel.from_pretrained was replaced by someone else after "
                "fastckpt.transformers.enable(); not restoring it over their patch"
            )
        PreTrainedModel.from_pretrained = _original  # type: ignore[method-assign]
        _original = None


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _original is not None


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``with enabled(): ...`` — the drop-in for the block (left as it was found on exit)."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()
