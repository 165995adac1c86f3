"""Pieces of the vLLM migration tests: the model, the migration runner, a distribution check."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from migrate_helpers import Server, build_tiny_llama, start_server

LEASE_S = 2.0
BLOCK = 32
# the engine arguments of both sides (the target gets them as --vllm-arg KEY=JSON)
ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "block_size": BLOCK,
    "kv_cache_memory_bytes": 32 << 20,
    "max_num_seqs": 16,
    "enforce_eager": True,
    "skip_tokenizer_init": True,
    "seed": 0,
}


def build_llama(root: Path) -> Path:
    """A tiny random Llama vLLM's CPU build can run (head size 64; its attention kernels refuse
    smaller heads), float32, saved as a stock safetensors folder."""
    return build_tiny_llama(
        root,
        convert=False,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )


def start_vllm_target(model: Path) -> Server:
    """A target server process, ``python -m fastckpt.migrate.serve --engine vllm``, with the
    engine arguments of the source; it exits when its standard input closes or on SIGTERM."""
    extra = ["--engine", "vllm", "--exit-on-stdin-eof"]
    for key, value in ENGINE_ARGS.items():
        extra += ["--vllm-arg", f"{key}={json.dumps(value)}"]
    return start_server(model, lease_s=LEASE_S, extra=tuple(extra), env=dict(os.environ))


def probability_transform(
    probs: Sequence[Sequence[float]], tokens: Sequence[int], seed: int = 0
) -> list[float]:
    """Randomised probability integral transform of discrete draws: for a token t drawn from
    distribution p, ``P(more likely tokens) + v * p(t)`` with v uniform is uniform on [0, 1].
    Tokens are ordered by probability (most likely first), so a sampler that leans towards the
    likeliest tokens (greedy, a lower temperature) gives values bunched near 0."""
    rng = random.Random(seed)
    out = []
    for p, t in zip(probs, tokens, strict=True):
        above = sum(q for i, q in enumerate(p) if q > p[t] or (q == p[t] and i < t))
        out.append(above + rng.random() * p[t])
    return out


def ks_uniform(values: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance between the values' empirical CDF and U(0, 1)."""
    xs = sorted(values)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


def ks_critical(n: int, alpha: float = 0.001) -> float:
    """Asymptotic KS critical value: D > this rejects uniformity at level alpha."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)
