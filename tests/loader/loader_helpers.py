"""Helpers shared by the loader tests: bitwise comparison and small checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

import fastckpt

PAGE = 4096


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor on the CPU."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes."""
    return set(loaded) == set(ref) and all(
        loaded[k].dtype == ref[k].dtype
        and loaded[k].shape == ref[k].shape
        and torch.equal(bits(loaded[k]), bits(ref[k]))
        for k in ref
    )


def make_ckpt(
    root: Path, name: str, seed: int, n: int = 6, numel: int = 3000
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded multi-partition fastckpt checkpoint (32 KiB partitions) and its state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(numel + 17 * i, generator=g) for i in range(n)}
    sd["half"] = torch.randn(99, generator=g).to(torch.bfloat16)
    path = root / name
    fastckpt.save(sd, path, partition_bytes=32 << 10, metadata=None)
    return path, sd
