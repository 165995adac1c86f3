"""Building the model skeleton: parameters on ``meta``, buffers computed on the CPU.

The model class is resolved from the config (Auto classes, names, remote code when allowed) and
built with every parameter registered on the ``meta`` device: nothing is allocated or initialised
for weights. Buffers are computed on the CPU as the model's ``__init__`` (and, in transformers
>= 5, its ``_init_weights``) defines them, exactly as transformers computes them. Also the dtype
helpers every part of the integration shares.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "as_dtype",
    "build_skeleton",
    "config_dtype",
    "init_parameter_names",
    "parameters_on_meta",
    "resolve_model_class",
    "set_config_dtype",
    "transformers_major",
]

logger = logging.getLogger("fastckpt.integrations.transformers")


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".", 1)[0])


def as_dtype(value: Any, *, what: str = "dtype") -> torch.dtype | None:
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


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config records (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    attr = "dtype" if transformers_major() >= 5 else "torch_dtype"
    try:
        return as_dtype(getattr(config, attr, None))
    except ValueError:
        return None


def set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    setattr(config, "dtype" if transformers_major() >= 5 else "torch_dtype", dtype)


_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
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


def is_auto_class(cls: Any) -> bool:
    return isinstance(cls, type) and getattr(cls, "_model_mapping", None) is not None


def resolve_model_class(
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
    if is_auto_class(cls):
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


def init_parameter_names(cls: type) -> set[str] | None:
    """Keyword names a model's ``__init__`` accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "config"}


def build_skeleton(
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
    kwargs["dtype" if transformers_major() >= 5 else "torch_dtype"] = build_dtype
    previous = torch.get_default_dtype()
    with parameters_on_meta(), _no_weight_init():
        try:
            model = cls._from_config(config, **kwargs)
        finally:
            torch.set_default_dtype(previous)
    if transformers_major() >= 5:
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
