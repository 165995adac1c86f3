"""The vLLM model loader for ``load_format="fastckpt"``. Imports vLLM: only ``register()`` (run by
vLLM's plug-in mechanism) imports this module.

vLLM builds the model (its own classes, on its target device, with its tensor-parallel
layout); this loader fills its parameters from fastckpt, in one of two ways:

- a checkpoint (fastckpt or stock safetensors folder): the model's ``load_weights`` is fed by
  the weight source (``weights.iter_weights``: windows on the worker's device). With tensor
  parallelism, a probe pass first learns what this rank keeps of each tensor
  (``shards.learn_boxes``), and only that is read;
- a per-rank export (``fastckpt vllm-export``): this rank's checkpoint is read straight into
  the parameters (``export.fill``).

Either way vLLM post-processes the weights afterwards, as with its own loaders. With the
``export_dir`` option the rank's weights are saved there first (``fastckpt vllm-export``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn
from vllm.config import LoadConfig, ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

# Everything a load needs is imported with the plug-in (vLLM imports it when a process starts),
# so that the time vLLM reports for loading is reading bytes, not importing modules.
import fastckpt.loader.api  # noqa: F401
from fastckpt.errors import SourceError
from fastckpt.integrations.vllm import export, shards  # noqa: F401
from fastckpt.integrations.vllm.options import VllmLoadOptions, parse_options
from fastckpt.integrations.vllm.weights import (
    iter_weights,
    load_checked,
    open_loader,
    storage_order,
)
from fastckpt.rules.urls import is_url

# Under the "vllm" logger namespace, so that vLLM's log configuration shows these lines.
logger = init_logger("vllm.fastckpt")


def parallel_ranks() -> tuple[int, int, int, int]:
    """(tensor-parallel rank, size, pipeline-parallel rank, size) of this worker."""
    from vllm.distributed import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    pp = get_pp_group()
    return (
        get_tensor_model_parallel_rank(),
        get_tensor_model_parallel_world_size(),
        pp.rank_in_group,
        pp.world_size,
    )


def running_target(model_config: ModelConfig, tp_size: int, pp_size: int) -> export.Target:
    """What this engine runs, in the terms a per-rank export records."""
    import vllm

    hf = getattr(model_config, "hf_config", None)
    quant_cfg = getattr(hf, "quantization_config", None) if hf is not None else None
    return export.Target(
        architecture=",".join(model_config.architectures or ["?"]),
        tensor_parallel_size=tp_size,
        pipeline_parallel_size=pp_size,
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization,
        quantization_config=export.canonical_json(quant_cfg),
        vllm=export.vllm_release(vllm.__version__),
    )


def weights_device(model: nn.Module) -> str:
    """Where the weight source puts tensors: the device of the model's parameters when it is a
    CUDA device (device tensors, copied device to device), else the CPU."""
    for p in model.parameters():
        if p.device.type == "cuda":
            index = p.device.index if p.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index}"
        if p.device.type != "meta":
            break
    return "cpu"


class FastckptModelLoader(BaseModelLoader):
    """``--load-format fastckpt``: weights from a fastckpt folder, a stock safetensors folder or a
    per-rank export of ``fastckpt vllm-export``.

    Options come from ``--model-loader-extra-config`` (see ``options.VllmLoadOptions``); they are
    checked when the loader is created, so a bad option fails before any model is built.
    """

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = load_config.model_loader_extra_config
        self.options: VllmLoadOptions = parse_options(extra if extra else None)
        self.last_stats: Any = None

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
        from fastckpt.loader.stats import combine

        path = self.checkpoint_path(model_config)
        start = time.perf_counter()
        tp_rank, tp_size, pp_rank, pp_size = parallel_ranks()
        device = weights_device(model)
        running = running_target(model_config, tp_size, pp_size)
        loader, release = open_loader(self.options)
        try:
            if export.is_export(path):
                mode = "per-rank export"
                state = model.state_dict(keep_vars=True)
                stats = export.fill(
                    state,
                    path,
                    running,
                    tp_rank,
                    pp_rank,
                    options=self.options,
                    device=device,
                    loader=loader,
                )
            else:
                mode, parts = self._feed(model, model_config, path, device, tp_size, loader)
                stats = combine(parts, seconds=time.perf_counter() - start)
        finally:
            release()
        seconds = time.perf_counter() - start
        self.last_stats = stats
        # The same words as vLLM's default loader, so one log parser reads both.
        logger.info(
            "Loading weights took %.2f seconds (fastckpt, %s, %s, engine=%s, verify=%s)",
            seconds,
            mode,
            path,
            self.options.engine,
            self.options.verify,
        )
        logger.info(
            "fastckpt rank tp=%d/%d pp=%d/%d on %s: read %d bytes for %d bytes of tensors "
            "(checkpoint %d bytes) via %s",
            tp_rank,
            tp_size,
            pp_rank,
            pp_size,
            device,
            stats.read_nbytes,
            stats.nbytes,
            _checkpoint_nbytes(path, tp_rank, pp_rank, running),
            stats.path_taken,
        )
        if self.options.export_dir:
            out = export.snapshot(
                model.state_dict(keep_vars=True), self.options.export_dir, running, tp_rank, pp_rank
            )
            logger.info("fastckpt: exported rank tp=%d pp=%d to %s", tp_rank, pp_rank, out)

    def _feed(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        path: str,
        device: str,
        tp_size: int,
        loader: Any,
    ) -> tuple[str, list[Any]]:
        """The model's ``load_weights`` fed by the weight source; with tensor parallelism (and
        an unquantized model, no ``verify``), only this rank's share of each tensor is read."""
        from fastckpt.format import dtypes
        from fastckpt.format.reader import read_index
        from fastckpt.integrations.vllm.shards import learn_boxes, per_stored

        index = read_index(path)
        load_fn = cast(Callable[[Iterable[tuple[str, Any]]], Any], model.load_weights)
        boxes = None
        mode = "whole tensors"
        if tp_size > 1 and model_config.quantization is None and not self.options.verify:
            order = storage_order(index)
            entries = [
                (
                    name,
                    index.tensors[stored].shape,
                    dtypes.torch_dtype(index.tensors[stored].dtype, tensor=stored),
                )
                for name, stored in order
            ]
            answers = learn_boxes(load_fn, entries, model.named_parameters())
            boxes = per_stored(answers, dict(order))
            mode = "this rank's shares"
        parts: list[Any] = []
        quantized = model_config.quantization is not None
        load_checked(
            load_fn,
            iter_weights(
                path,
                self.options,
                device=device,
                boxes=boxes,
                loader=loader,
                stats=parts,
                index=index,
            ),
            expected=None if quantized else {name for name, _ in model.named_parameters()},
            checkpoint=path,
            model=f"{model_config.model} ({', '.join(model_config.architectures or ['?'])})",
        )
        return mode, parts


def _checkpoint_nbytes(path: str, tp_rank: int, pp_rank: int, running: export.Target) -> int:
    from fastckpt.format.reader import read_index

    try:
        if export.is_export(path):
            path = os.path.join(path, export.rank_dir(running, tp_rank, pp_rank))
        return sum(e.nbytes for e in read_index(path).tensors.values())
    except Exception:  # a log figure only
        return -1
