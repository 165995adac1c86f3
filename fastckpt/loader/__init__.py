"""The loader: ``plan`` and ``policy`` (pure Python, no torch), ``executor`` (torch, the C++
engine), and ``Loader`` (``session``: the object that owns engines, pinned pool and tiers).

``fastckpt.loader.plan`` imports without torch, so a scheduler can plan (and estimate) a load on a
machine with no GPU; ``load`` and the executor are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.api import load
    from fastckpt.loader.plan import LoadPlan, plan_load
    from fastckpt.loader.session import Loader
    from fastckpt.loader.stats import LoadStats, last_stats

_LAZY = {
    "load": "fastckpt.loader.api",
    "Loader": "fastckpt.loader.session",
    "LoadPlan": "fastckpt.loader.plan",
    "plan_load": "fastckpt.loader.plan",
    "LoadStats": "fastckpt.loader.stats",
    "last_stats": "fastckpt.loader.stats",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastckpt.loader' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["LoadPlan", "LoadStats", "Loader", "last_stats", "load", "plan_load"]
