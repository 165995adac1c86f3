"""``load_model``: a transformers model whose every tensor comes from one ``fastckpt.load``.

1. The checkpoint's index is read once: it gives the build dtype, the name mapping and the
   device map in checkpoint names, and is handed to ``fastckpt.load`` (no second read).
2. The skeleton is built on ``meta`` (:mod:`.skeleton`) and the checkpoint's names are mapped
   onto it from the index alone (:mod:`.names`); a shape mismatch is refused before any byte is
   read.
3. The checkpoint is loaded once (one storage per partition, on the target device or devices)
   and each tensor becomes the model's parameter or buffer as is: no second copy. Only a
   requested ``dtype`` different from the stored one makes a (cast) copy.
4. Tied weights are tied by the model's own ``tie_weights()``, buffers absent from the
   checkpoint are moved to their device, the model is put in eval mode, and no tensor may remain
   on ``meta``.

When the checkpoint's names do not map one to one onto the model (weights that the installed
transformers renames or fuses at load time, parameters missing from the checkpoint such as a new
classification head), the tensors already loaded are handed to transformers' own
``from_pretrained(None, config=..., state_dict=...)``, so the result is what transformers would
build (it may copy tensors; a warning says so).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FormatError
from fastckpt.integrations.transformers.devices import (
    dispatch,
    place_remaining_buffers,
    resolve_devices,
)
from fastckpt.integrations.transformers.names import (
    Report,
    Slot,
    checkpoint_device_map,
    filter_missing,
    keep_fp32_patterns,
    keeps_fp32,
    match_names,
    model_slots,
)
from fastckpt.integrations.transformers.skeleton import (
    as_dtype,
    build_skeleton,
    config_dtype,
    init_parameter_names,
    resolve_model_class,
    set_config_dtype,
    transformers_major,
)
from fastckpt.rules.urls import is_url

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from fastckpt.format.index import Index

__all__ = ["is_fastckpt_checkpoint", "load_model", "load_model_with_report"]

logger = logging.getLogger("fastckpt.integrations.transformers")


INDEX_FILE = "fastckpt.index"  # FORMAT.md section 1 (fastckpt.format.spec.INDEX_FILE)


CONFIG_FILE = "config.json"


GENERATION_CONFIG_FILE = "generation_config.json"


ADAPTER_CONFIG_FILE = "adapter_config.json"


def is_fastckpt_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory holding a fastckpt index."""
    try:
        root = os.fspath(path)
    except TypeError:
        return False
    return os.path.isdir(root) and os.path.isfile(os.path.join(root, INDEX_FILE))


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


def _first_float_dtype(index: Index | None) -> torch.dtype | None:
    if index is None:
        return None
    for entry in index.tensors.values():
        if entry.dtype in ("float16", "bfloat16", "float32", "float64"):
            return as_dtype(entry.dtype)
    return None


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
    model, _ = load_model_with_report(
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


def load_model_with_report(
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
    index: Index | None = None,
) -> tuple[PreTrainedModel, Report]:
    """``load_model``, also returning what was missing/unexpected; ``index`` when read already.
    A remote checkpoint (``s3://``, ``https://``) is read as it downloads: its carried files
    (``config.json``...) as soon as they arrive, its weights through ``fastckpt.load``."""
    options = dict(
        device=device,
        dtype=dtype,
        model_class=model_class,
        trust_remote_code=trust_remote_code,
        config=config,
        verify=verify,
        kwargs=kwargs,
        generation_config=generation_config,
    )
    if is_url(path):
        from fastckpt.loader.remotefiles import model_folder

        url = os.fspath(path)
        with model_folder(url) as (folder, remote_index):
            return _load_model(url, folder, remote=True, index=remote_index, **options)
    root = os.fspath(path)
    return _load_model(root, root, remote=False, index=index, **options)


def _load_model(
    root: str,
    folder: str,
    *,
    remote: bool,
    device: Any,
    dtype: Any,
    model_class: Any,
    trust_remote_code: bool,
    config: PretrainedConfig | None,
    verify: bool,
    kwargs: dict[str, Any],
    generation_config: Any,
    index: Index | None,
) -> tuple[PreTrainedModel, Report]:
    """``load_model_with_report`` for a checkpoint at ``root`` whose carried files are in
    ``folder`` (the same local folder, or the carried files of a remote checkpoint)."""
    import copy

    import torch
    from transformers import PretrainedConfig

    import fastckpt

    if not remote and os.path.isfile(root):
        raise NotADirectoryError(
            errno.ENOTDIR,
            "load_model needs a model folder (config.json beside the weights: a fastckpt "
            "checkpoint or a save_pretrained folder), not a file; for the tensors of a weights "
            "file alone use fastckpt.load(path)",
            root,
        )
    if not remote and not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "checkpoint directory not found", root)
    kwargs = dict(kwargs)
    attn_implementation = kwargs.pop("attn_implementation", None)
    max_memory = kwargs.pop("max_memory", None)
    if config is None:
        config, init_kwargs = _read_config(
            folder, trust_remote_code=trust_remote_code, overrides=kwargs
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

    cls = resolve_model_class(config, model_class, trust_remote_code=trust_remote_code, path=folder)
    accepted = init_parameter_names(cls)
    if accepted is not None:
        unknown = sorted(set(init_kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"load_model() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
                f"neither config attributes nor arguments of {cls.__name__}.__init__"
            )

    auto = isinstance(dtype, str) and dtype == "auto"
    target = config_dtype(config) if auto else as_dtype(dtype)
    if index is None:
        index = fastckpt.read_index(root)  # read once: shapes, dtypes, device map, then the load
    build_dtype = target or config_dtype(config) or _first_float_dtype(index) or torch.float32
    if not build_dtype.is_floating_point or build_dtype.itemsize < 2:
        build_dtype = torch.float32
    pristine_config = copy.deepcopy(config)
    model = build_skeleton(cls, config, build_dtype, init_kwargs)

    single, device_map = resolve_devices(model, device, dtype=target, max_memory=max_memory)

    slots = model_slots(model)
    shapes = {name: index.entry(name).shape for name in index.names()}
    missing, unexpected, mismatched = match_names(model, slots, shapes)
    if mismatched:
        raise _mismatch_error(cls, mismatched, root)
    target_devices: str | dict[str, str]
    if device_map is None:
        assert single is not None
        target_devices = single
    else:
        target_devices = checkpoint_device_map(index, slots, device_map)

    load_options: dict[str, Any] = {"verify": True} if verify else {}
    state = fastckpt.load(
        root, device=target_devices, index=None if remote else index, **load_options
    )
    report = Report(unexpected_keys=unexpected)
    _assign(model, slots, state, target)

    _tie(model, missing)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    unresolved = filter_missing(model, [n for n in missing if n in still_meta])
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
        report = Report(missing_keys=unresolved, fallback_reason=reason)
    else:
        place_remaining_buffers(model, single, device_map)
        set_config_dtype(model.config, target or build_dtype)
    if device_map is None or report.fallback_reason is None:
        # (accelerate legitimately leaves offloaded weights on meta after dispatching a map)
        _check_materialised(model, root)
    if device_map is not None and report.fallback_reason is None:
        dispatch(model, device_map)
    model.config.name_or_path = root
    _load_generation_config(model, folder, generation_config)
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
    slots: list[Slot],
    state: Mapping[str, torch.Tensor],
    target: torch.dtype | None,
) -> None:
    """Make each matched slot's tensor the model's parameter or buffer (cast only if asked).

    A tensor the checkpoint stores once under several names (an alias) becomes one Parameter.
    With a target dtype, floating tensors take the dtype of the skeleton's slot (built under
    the target dtype), float32 for modules the model keeps in float32, as transformers does.
    """
    import torch

    patterns = keep_fp32_patterns(model, target)
    converted: dict[int, torch.Tensor] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for slot in slots:
        if slot.source is None:
            continue
        tensor = state[slot.source]
        if target is not None and tensor.is_floating_point():
            want = torch.float32 if keeps_fp32(slot.name, patterns) else slot.dtype
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
    if transformers_major() >= 5:
        return cls.from_pretrained(
            None, config=config, state_dict=dict(state), device_map=device, dtype=dtype, **kwargs
        )
    # transformers 4.x re-reads weight files when low_cpu_mem_usage / device_map are given, so
    # it builds the model on the CPU, copies the state dict in, and the model is moved after.
    model: Any = cls.from_pretrained(
        None, config=config, state_dict=dict(state), torch_dtype=dtype, **kwargs
    )
    if isinstance(device, dict):
        dispatch(model, device)
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
