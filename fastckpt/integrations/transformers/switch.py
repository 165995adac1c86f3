"""The ``from_pretrained`` switch: ``enable()`` / ``disable()`` / ``enabled()``.

While enabled, ``PreTrainedModel.from_pretrained`` (so every concrete and Auto model class)
serves a local fastckpt checkpoint, and an ordinary local safetensors model folder (one
``model.safetensors`` or sharded with ``model.safetensors.index.json``), through
:func:`~fastckpt.integrations.transformers.loading.load_model_with_report`. Everything else goes
to the original method untouched; for a stock folder that fastckpt cannot serve exactly as
transformers would (a quantization config, remote code, weight variants, options it does not
support, ...), a debug log on ``fastckpt.integrations.transformers`` says why it was passed on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.errors import FastckptError
from fastckpt.integrations.transformers.loading import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    is_fastckpt_checkpoint,
    load_model_with_report,
)
from fastckpt.integrations.transformers.skeleton import transformers_major
from fastckpt.rules.urls import is_url

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from fastckpt.format.index import Index

__all__ = ["disable", "enable", "enabled", "is_enabled"]

logger = logging.getLogger("fastckpt.integrations.transformers")


_PATCH_LOCK = threading.Lock()


_original: Any = None  # the classmethod object replaced by enable()


# The weight files of a stock model folder that fastckpt serves (single file or sharded).
_STOCK_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

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
    """The local fastckpt checkpoint that ``name_or_path`` (and ``subfolder``) names, if any."""
    root = _local_dir(name_or_path, subfolder)
    return root if root is not None and is_fastckpt_checkpoint(root) else None


def _local_dir(name_or_path: Any, subfolder: Any) -> str | None:
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    root = os.fspath(name_or_path)
    if isinstance(subfolder, str) and subfolder:
        root = os.path.join(root, subfolder)
    return root if os.path.isdir(root) else None


def _log_not_a_folder(name_or_path: Any, subfolder: Any, *, hub_note: bool = True) -> None:
    """Say why a name that is not a local model folder goes to transformers. A file, or a path
    that cannot be a Hub repo id (absolute, ``./``, ``../``, ``~``) and does not exist, gets a
    warning: transformers takes it for a Hub repo id and only says that it is not a valid one."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        if hub_note:
            logger.debug("from_pretrained(%r): left to transformers: not a path", name_or_path)
        return
    given = os.fspath(name_or_path)
    path = os.path.join(given, subfolder) if isinstance(subfolder, str) and subfolder else given
    if os.path.isfile(path):
        logger.warning(
            "from_pretrained(%r): left to transformers: a file, not a model folder (give the "
            "folder that holds config.json and the weights)",
            path,
        )
    elif os.path.exists(given) or given.startswith(("/", "./", "../", "~")):
        logger.warning("from_pretrained(%r): left to transformers: no such local folder", path)
    elif hub_note:
        logger.debug(
            "from_pretrained(%r): left to transformers: no local folder of that name (a Hub "
            "repo id)",
            path,
        )


def _stock_decline(
    root: str, model_args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Index | None, str | None]:
    """For a local model folder that is not a fastckpt checkpoint: (its index, None) when
    fastckpt serves it exactly as transformers would, else (None, why it is passed on)."""
    import fastckpt

    if os.path.isfile(os.path.join(root, ADAPTER_CONFIG_FILE)):
        return None, (
            f"a peft adapter folder ({ADAPTER_CONFIG_FILE}; transformers loads the base model "
            "it names, or load the base, then fastckpt.load_lora(model, folder))"
        )
    if not os.path.isfile(os.path.join(root, CONFIG_FILE)):
        return None, f"no {CONFIG_FILE} (not a transformers model folder)"
    if not any(os.path.isfile(os.path.join(root, f)) for f in _STOCK_WEIGHTS):
        return None, "no model.safetensors or model.safetensors.index.json (another weight format)"
    if model_args:
        return None, "positional model arguments"
    for name, (allowed, _) in _UNSUPPORTED.items():
        value = kwargs.get(name, allowed)
        if value is not allowed and value != allowed:
            return None, f"{name}= is not supported by fastckpt"
    if kwargs.get("use_safetensors", True) is False:
        return None, "use_safetensors=False"
    adapter = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")
    if adapter is not None:
        return None, f"the base model of the peft adapter {adapter!r} (transformers loads both)"
    if isinstance(kwargs.get("dtype"), Mapping) or isinstance(kwargs.get("torch_dtype"), Mapping):
        return None, "a dtype per sub-model"
    config = kwargs.get("config")
    if config is not None and getattr(config, "quantization_config", None) is not None:
        return None, "the config passed has a quantization_config"
    try:
        with open(os.path.join(root, CONFIG_FILE), encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, f"{CONFIG_FILE} is not readable JSON ({exc})"
    if not isinstance(raw, dict):
        return None, f"{CONFIG_FILE} is not a JSON object"
    if raw.get("quantization_config") is not None:
        return None, "the config has a quantization_config (a quantized checkpoint)"
    if raw.get("auto_map"):
        return None, "the config names custom (remote) code in auto_map"
    try:
        index = fastckpt.read_index(root)
    except (FastckptError, OSError) as exc:
        return None, f"fastckpt does not read these weights ({exc})"
    if index.kind != "safetensors":
        return None, f"a {index.kind} index in a stock folder"
    fmt = index.metadata.get("format")
    if fmt not in (None, "pt"):
        return None, f"the safetensors metadata says format={fmt!r}, not 'pt'"
    return index, None


def _from_pretrained(
    cls: type[PreTrainedModel],
    root: str,
    model_args: tuple[Any, ...],
    kwargs: dict[str, Any],
    index: Index | None = None,
) -> Any:
    """``cls.from_pretrained(root, ...)`` for a local fastckpt checkpoint (or a stock folder
    that :func:`_stock_decline` accepted, with its index)."""
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
        dtype = "auto" if transformers_major() >= 5 else torch.get_default_dtype()
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config, kwargs = AutoConfig.from_pretrained(
            config, trust_remote_code=trust_remote_code, return_unused_kwargs=True, **kwargs
        )
    model, report = load_model_with_report(
        root,
        device="cpu" if device_map is None else device_map,
        dtype=dtype,
        model_class=cls,
        trust_remote_code=trust_remote_code,
        config=config,
        verify=False,
        kwargs=kwargs,
        generation_config=generation_config,
        index=index,
    )
    if output_loading_info:
        return model, report.as_loading_info()
    return model


def enable() -> None:
    """Route ``from_pretrained`` of every transformers model class through fastckpt.

    After this, ``AutoModelForCausalLM.from_pretrained(path, ...)`` (any Auto or concrete class)
    loads a local fastckpt checkpoint (a directory with ``fastckpt.index``), a stock safetensors
    model folder, or such a checkpoint at an ``s3://`` or ``https://`` URL with
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
            if is_url(pretrained_model_name_or_path):
                # s3:// and https:// checkpoints: transformers has no loader for them
                url = os.fspath(pretrained_model_name_or_path)
                sub = kw.get("subfolder")
                return _from_pretrained(cls, f"{url.rstrip('/')}/{sub}" if sub else url, args, kw)
            root = _local_dir(pretrained_model_name_or_path, kw.get("subfolder"))
            if root is None:
                _log_not_a_folder(pretrained_model_name_or_path, kw.get("subfolder"))
                return original_func(cls, pretrained_model_name_or_path, *args, **kw)
            if is_fastckpt_checkpoint(root):
                return _from_pretrained(cls, root, args, kw)
            index, why = _stock_decline(root, args, kw)
            if index is None:
                logger.debug("from_pretrained(%r): left to transformers: %s", root, why)
                return original_func(cls, pretrained_model_name_or_path, *args, **kw)
            logger.debug("from_pretrained(%r): stock safetensors folder, loaded by fastckpt", root)
            return _from_pretrained(cls, root, args, kw, index=index)

        from_pretrained.__fastckpt_patch__ = True  # type: ignore[attr-defined]
        PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment,method-assign]
        _original = original
        _note_auto_classes()


# The Auto classes' from_pretrained (AutoModelForCausalLM...) reads the config before it reaches
# a model class's: a file, a missing path or an adapter folder given to it never gets to the
# patch above. enable() wraps theirs too (each Auto class has its own copy): to say why such a
# call is left to transformers, and to send an s3:// or https:// URL to the model class its
# config.json names.
_original_auto: dict[type, Any] = {}


def _auto_classes() -> list[type]:
    try:
        import transformers.models.auto.modeling_auto  # noqa: F401  (defines the Auto classes)
        from transformers.models.auto.auto_factory import _BaseAutoModelClass
    except ImportError:  # pragma: no cover - a transformers without the Auto factory
        return []
    found: list[type] = []
    todo: list[type] = [_BaseAutoModelClass]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if isinstance(c.__dict__.get("from_pretrained"), classmethod)]


def _note_in_auto(original_func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original_func)
    def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *args: Any, **kw: Any) -> Any:
        if is_url(pretrained_model_name_or_path):
            return _auto_from_url(cls, pretrained_model_name_or_path, args, kw)
        subfolder = kw.get("subfolder")
        root = _local_dir(pretrained_model_name_or_path, subfolder)
        if root is None:
            _log_not_a_folder(pretrained_model_name_or_path, subfolder, hub_note=False)
        elif os.path.isfile(os.path.join(root, ADAPTER_CONFIG_FILE)) and not os.path.isfile(
            os.path.join(root, CONFIG_FILE)
        ):
            logger.debug(
                "from_pretrained(%r): left to transformers: a peft adapter folder; it loads the "
                "base model the adapter names, then the adapter (or load the base, then "
                "fastckpt.load_lora(model, folder))",
                root,
            )
        return original_func(cls, pretrained_model_name_or_path, *args, **kw)

    from_pretrained.__fastckpt_patch__ = True  # type: ignore[attr-defined]
    return from_pretrained


def _auto_from_url(cls: Any, url_or_path: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """An Auto class given an ``s3://`` or ``https://`` URL: the model class comes from the URL's
    config.json (read as the download starts); that class's patched ``from_pretrained`` then
    loads it, joining the same download."""
    from transformers import AutoConfig
    from transformers.models.auto import auto_factory

    from fastckpt.loader.remotefiles import model_folder

    kw = dict(kw)
    url = os.fspath(url_or_path)
    sub = kw.pop("subfolder", None)
    url = f"{url.rstrip('/')}/{sub}" if sub else url
    with model_folder(url) as (folder, _):
        config = kw.get("config") or AutoConfig.from_pretrained(folder)
        if type(config) not in cls._model_mapping:
            raise ValueError(
                f"{cls.__name__}.from_pretrained({url!r}): no {cls.__name__} class for config "
                f"{type(config).__name__} (custom code is not loaded from URLs)"
            )
        model_cls = auto_factory._get_model_class(config, cls._model_mapping)
        return model_cls.from_pretrained(url, *args, **kw)


def _note_auto_classes() -> None:
    for cls in _auto_classes():
        original = cls.__dict__["from_pretrained"]
        cls.from_pretrained = classmethod(_note_in_auto(original.__func__))  # type: ignore[attr-defined]
        _original_auto[cls] = original


def _restore_auto_classes() -> None:
    for cls, original in _original_auto.items():
        func = getattr(cls.__dict__.get("from_pretrained"), "__func__", None)
        if getattr(func, "__fastckpt_patch__", False):  # else someone patched over it: theirs
            cls.from_pretrained = original  # type: ignore[attr-defined]
    _original_auto.clear()


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
        _restore_auto_classes()


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
