"""Choosing the next token so that source and target draw the same one (torch, imported when
called): position-keyed draws by default, a shipped generator state as the alternative."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastckpt.migrate.state import RNG_GENERATOR, SamplingParams, step_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch


def choose_token(
    logits: torch.Tensor,
    sampling: SamplingParams,
    position: int,
    generator: torch.Generator | None = None,
) -> int:
    """The token for absolute ``position`` given the last position's ``logits`` (1-D).

    Greedy is ``argmax`` (lowest id on exact ties). Otherwise temperature, top-k, top-p, then one
    uniform draw mapped through the cumulative probabilities in token-id order. The draw comes
    from ``generator`` when given (``rng="generator"``), else from a CPU generator seeded with
    ``step_seed(sampling.seed, position)``.
    """
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits).item())
    x = logits.detach().to("cpu", torch.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < x.numel():
        kth = torch.topk(x, sampling.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of strictly more likely tokens
        drop = order[before >= sampling.top_p]
        probs[drop] = 0.0
    if generator is None:
        generator = torch.Generator().manual_seed(step_seed(sampling.seed, position))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    cdf = torch.cumsum(probs, 0)
    idx = int(torch.searchsorted(cdf, u * cdf[-1], right=True).item())
    idx = min(idx, probs.numel() - 1)
    while probs[idx] == 0.0 and idx > 0:  # never pick a token that was filtered out
        idx -= 1
    return idx


def generator_state(g: torch.Generator | None) -> bytes | None:
    return None if g is None else bytes(g.get_state().numpy().tobytes())


def new_generator(sampling: SamplingParams) -> torch.Generator | None:
    import torch

    if sampling.rng != RNG_GENERATOR:
        return None
    g = torch.Generator()
    if sampling.generator_state is not None:
        g.set_state(torch.frombuffer(bytearray(sampling.generator_state), dtype=torch.uint8))
    else:
        g.manual_seed(sampling.seed)
    return g


__all__ = ["choose_token", "generator_state", "new_generator"]
