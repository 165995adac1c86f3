"""Serverless serving on Ray Serve: a multiplexed deployment whose replicas load models through
fastckpt, keep checkpoints in their tiers after Ray Serve evicts a model, and report what they
hold so that ``fastckpt.sched.ray_serve.StartTimeRouter`` starts each model where it starts
soonest. See docs/serverless.md.

- :mod:`.catalog`: the one file mapping model names to checkpoints (no torch, no Ray);
- :mod:`.state`: a replica's models, tiers and routing stats (no torch, no Ray);
- :mod:`.host`: the Ray Serve deployment (``deployment``, ``build_app``; needs ``ray[serve]``).

Importing this package imports neither torch nor Ray; ``build_app`` and ``deployment`` import
Ray Serve when called.
"""

from __future__ import annotations

from typing import Any

from fastckpt.integrations.ray_serve.catalog import Catalog, CatalogError, ModelEntry

__all__ = ["Catalog", "CatalogError", "ModelEntry", "build_app", "deployment"]


def build_app(*args: Any, **kwargs: Any) -> Any:
    """``fastckpt.integrations.ray_serve.host.build_app`` (imports Ray Serve)."""
    from fastckpt.integrations.ray_serve.host import build_app as build

    return build(*args, **kwargs)


def deployment(*args: Any, **kwargs: Any) -> Any:
    """``fastckpt.integrations.ray_serve.host.deployment`` (imports Ray Serve)."""
    from fastckpt.integrations.ray_serve.host import deployment as make

    return make(*args, **kwargs)
