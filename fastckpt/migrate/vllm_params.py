"""Plain rules of migration between vLLM engines (no vLLM, no torch needed).

What a token state becomes as vLLM sampling arguments (``request_params``), the position-keyed
sampling spec that ``PositionSampler`` reads from a request's ``extra_args``, the seed of a
resumed ``rng="engine"`` request, and the bookkeeping of which rows of vLLM's persistent batch
draw by position (``PositionRows``). See ``fastckpt.migrate.vllm`` for the engine that uses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fastckpt.migrate.state import (
    RNG_ENGINE,
    RNG_GENERATOR,
    RNG_POSITION,
    SamplingParams,
    TokenState,
    step_seed,
)

SAMPLING_KEY = "fastckpt_sampling"
POSITION_SAMPLER = "fastckpt.migrate.vllm_sampler:PositionSampler"


def position_sampling_spec(sampling: SamplingParams) -> dict[str, Any]:
    """What ``PositionSampler`` reads from ``extra_args[SAMPLING_KEY]``."""
    return {
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }


def parse_position_sampling(spec: Any) -> SamplingParams:
    """The ``SamplingParams`` of an ``extra_args[SAMPLING_KEY]`` value; ``ValueError``
    (``TokenStateError``) naming the field when it is malformed."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"extra_args[{SAMPLING_KEY!r}] must be a mapping, got {spec!r}")
    keys = ("temperature", "top_k", "top_p", "seed")
    unknown = sorted(set(spec) - set(keys))
    missing = [k for k in keys if k not in spec]
    if unknown or missing:
        raise ValueError(
            f"extra_args[{SAMPLING_KEY!r}] needs exactly {list(keys)}; "
            f"missing {missing}, unknown {unknown}"
        )
    return SamplingParams(**{k: spec[k] for k in keys}, rng=RNG_POSITION)


def continuation_seed(seed: int, position: int) -> int:
    """vLLM seed of a ``rng="engine"`` request resumed at absolute ``position`` (a fresh stream,
    the same for every resumption of the same state)."""
    return step_seed(seed, position)


def request_params(state: TokenState, *, position_sampling: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` that continue ``state`` (or start it, when
    nothing is generated yet), less ``output_kind``.

    Raises ``ValueError`` for what cannot move between vLLM engines (see the module docstring).
    """
    s = state.sampling
    stop = state.stop
    if stop.stop_strings:
        raise ValueError(
            "stop strings are not supported by the vLLM migration adapter (vLLM checks them only "
            "in newly generated text, so one spanning the switch would be missed)"
        )
    remaining = stop.max_new_tokens - len(state.generated_ids)
    if remaining < 1:
        raise ValueError(f"request {state.request_id!r} has no tokens left to generate")
    kw: dict[str, Any] = {
        "max_tokens": remaining,
        "stop_token_ids": list(stop.stop_token_ids),
        "ignore_eos": True,
        "detokenize": False,
        "temperature": 0.0,
    }
    if s.greedy:
        return kw
    if s.rng == RNG_POSITION:
        if not position_sampling:
            raise ValueError(
                "rng='position' needs the PositionSampler logits processor on this engine "
                f"(EngineArgs(logits_processors=[{POSITION_SAMPLER!r}]); VllmEngine.from_args "
                "installs it)"
            )
        kw["extra_args"] = {SAMPLING_KEY: position_sampling_spec(s)}
        return kw
    if s.rng == RNG_ENGINE:
        seed = s.seed if not state.generated_ids else continuation_seed(s.seed, len(state.tokens))
        kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed)
        return kw
    assert s.rng == RNG_GENERATOR
    raise ValueError(
        "rng='generator' cannot run on vLLM: its per-request generator state cannot be read "
        "out or restored; use rng='position' (exact) or rng='engine'"
    )


class PositionRows:
    """Which rows of vLLM's persistent batch draw by position, and the position of each.

    ``update`` takes a batch update as plain data, in vLLM's order (removed, added, moved):
    removed row indices; added ``(row, spec or None, prompt ids, live output ids)``; moved
    ``(from, to, swap)``. The output list is vLLM's own, so the position stays current.
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[SamplingParams, int, Sequence[int]]] = {}

    def update(
        self,
        removed: Sequence[int],
        added: Sequence[tuple[int, Any, Sequence[int] | None, Sequence[int]]],
        moved: Sequence[tuple[int, int, bool]],
    ) -> None:
        for row in removed:
            self._rows.pop(row, None)
        for row, spec, prompt, output in added:
            if spec is None:
                self._rows.pop(row, None)
                continue
            if prompt is None:
                raise ValueError("position-keyed sampling needs prompt token ids")
            self._rows[row] = (parse_position_sampling(spec), len(prompt), output)
        for a, b, swap in moved:
            at_a = self._rows.pop(a, None)
            at_b = self._rows.pop(b, None)
            if at_a is not None:
                self._rows[b] = at_a
            if swap and at_b is not None:
                self._rows[a] = at_b

    def positions(self) -> Iterator[tuple[int, SamplingParams, int]]:
        """``(row, sampling, absolute position of the token to draw)`` per tracked row."""
        for row, (sampling, prompt_len, output) in self._rows.items():
            yield row, sampling, prompt_len + len(output)

    def __len__(self) -> int:
        return len(self._rows)


__all__ = [
    "POSITION_SAMPLER",
    "SAMPLING_KEY",
    "PositionRows",
    "continuation_seed",
    "parse_position_sampling",
    "position_sampling_spec",
    "request_params",
]
