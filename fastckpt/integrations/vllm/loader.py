"""The vLLM model loader for ``load_format="fastckpt"``. Imports vLLM: only ``register()`` (run by
vLLM's plug-in mechanism) imports this module.

vLLM builds the model (its own classes, on its target device, with its tensor-parallel
layout); this loader only feeds the model's ``load_weights`` from fastckpt and checks that the
checkpoint filled every parameter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from torch import nn
from vllm.config import LoadConfig, ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from fastckpt.errors import SourceError
from fastckpt.integrations.vllm.options import VllmLoadOptions, parse_options
from fastckpt.integrations.vllm.weights import iter_weights, load_checked
from fastckpt.rules.urls import is_url

# Under the "vllm" logger namespace, so that vLLM's log configuration shows these lines.
logger = init_logger("vllm.fastckpt")


class FastckptModelLoader(BaseModelLoader):
    """``--load-format fastckpt``: weights from a fastckpt folder or a stock safetensors folder.

    Options come from ``--model-loader-extra-config`` (see ``options.VllmLoadOptions``); they are
    checked when the loader is created, so a bad option fails before any model is built.
    """

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = load_config.model_loader_extra_config
        self.options: VllmLoadOptions = parse_options(extra if extra else None)

    def checkpoint_path(self, model_config: ModelConfig) -> str:
        """The local path the weights are read from: the ``checkpoint`` option, else the model
        folder. vLLM's ``--model`` may name a hub repository; this loader reads local folders
        only (download first, e.g. ``huggingface-cli download``)."""
        path = self.options.checkpoint or model_config.model
        if self.options.checkpoint and is_url(path):
            return path  # an s3:// or https:// checkpoint: fastckpt.load streams it
        if not os.path.exists(path):
            raise SourceError(
                "load format 'fastckpt' reads a local folder, and this path does not exist; "
                "download the model first (or convert it with `fastckpt convert`) and pass "
                "its folder",
                path=str(path),
            )
        return os.path.abspath(path)

    def download_model(self, model_config: ModelConfig) -> None:
        self.checkpoint_path(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        path = self.checkpoint_path(model_config)
        start = time.perf_counter()
        quantized = model_config.quantization is not None
        load_checked(
            cast(Callable[[Iterable[tuple[str, Any]]], Any], model.load_weights),
            iter_weights(path, self.options),
            expected=None if quantized else {name for name, _ in model.named_parameters()},
            checkpoint=path,
            model=f"{model_config.model} ({', '.join(model_config.architectures or ['?'])})",
        )
        # The same words as vLLM's default loader, so one log parser reads both.
        logger.info(
            "Loading weights took %.2f seconds (fastckpt, %s, engine=%s, verify=%s)",
            time.perf_counter() - start,
            path,
            self.options.engine,
            self.options.verify,
        )
