"""Position-keyed sampling inside vLLM: a logits processor that draws fastckpt's way.

vLLM's own seeded sampling keeps one ``torch.Generator`` per request, seeded once and advanced
at every sampled step; it cannot be created at a given position, so a request resumed on another
engine cannot continue its draws. This processor makes a request's draws a pure function of
(seed, absolute position) instead, the ``rng="position"`` mode of ``fastckpt.migrate``: for each
request that carries ``extra_args["fastckpt_sampling"]`` it chooses the token with
``fastckpt.migrate.sampling.choose_token`` (the reference engine's rule: temperature, top-k,
top-p, one uniform draw seeded with ``step_seed(seed, position)``) on the raw logits, and leaves
only that token's logit finite. The request is sent to vLLM as greedy, so vLLM's own sampler
picks that token and consumes no random state.

Install it on every engine that takes part (``VllmEngine`` does):
``EngineArgs(logits_processors=[POSITION_SAMPLER])`` (the class name as a string, so that
vLLM imports this module in each of its processes).

This module imports vLLM and torch (vLLM loads it by the class name above); the rest of
``fastckpt.migrate`` does not import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from fastckpt.migrate.sampling import choose_token
from fastckpt.migrate.vllm_params import (
    POSITION_SAMPLER,
    SAMPLING_KEY,
    PositionRows,
    parse_position_sampling,
)

if TYPE_CHECKING:  # pragma: no cover
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import VllmConfig


class PositionSampler(LogitsProcessor):
    """vLLM logits processor for ``extra_args["fastckpt_sampling"]`` requests (see the module
    docstring). Not argmax-invariant: vLLM applies it to greedy requests too, before penalties
    and temperature, on float32 logits."""

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        extra = sampling_params.extra_args or {}
        if SAMPLING_KEY not in extra:
            return
        parse_position_sampling(extra[SAMPLING_KEY])  # ValueError names the bad field
        if sampling_params.temperature != 0.0:
            raise ValueError(
                f"a request with extra_args[{SAMPLING_KEY!r}] must be sent to vLLM as greedy "
                "(temperature 0): the processor draws the token itself"
            )

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.rows = PositionRows()

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.rows.update(
            batch_update.removed,
            [
                (i, (p.extra_args or {}).get(SAMPLING_KEY), prompt, out)
                for i, p, prompt, out in batch_update.added
            ],
            [(a, b, d.name == "SWAP") for a, b, d in batch_update.moved],
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, sampling, position in self.rows.positions():
            row = logits[index]
            token = choose_token(row, sampling, position)
            keep = row[token].clone()
            row.fill_(float("-inf"))
            row[token] = keep
        return logits


__all__ = ["POSITION_SAMPLER", "PositionSampler"]
