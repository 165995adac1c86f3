"""Live migration of in-flight generations by token state (``fastckpt.migrate``).

A running generation moves from a source engine to a target engine without shipping its KV
cache: the target recomputes the cache by prefilling the tokens, in rounds, while the source
keeps decoding; when a round's new tokens fall to a threshold the source freezes at a step
boundary and the target continues. See docs/migrate.md.

Engine-agnostic pieces import without torch: ``TokenState`` (and its bytes), the
``MigrationSource`` / ``MigrationTarget`` protocols, the ``migrate`` driver and its report, the
``Transport`` interface with a TCP implementation, ``TargetHost`` / ``RemoteTarget``, and the
recompute cost model. ``ReferenceEngine`` (torch, transformers) implements both sides over a
transformers causal LM and ``VllmEngine`` over vLLM's engine; each is imported only when asked
for (``fastckpt.migrate.vllm`` imports vLLM only when an engine is made).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastckpt.migrate.driver import MigrationReport, Outcome, RoundInfo, migrate
from fastckpt.migrate.errors import (
    LeaseExpiredError,
    MigrationError,
    ModelMismatchError,
    RemoteError,
    SourceStateError,
    TargetStateError,
    TokenStateChecksumError,
    TokenStateError,
    TokenStateVersionError,
    TransportError,
)
from fastckpt.migrate.protocol import MigrationSource, MigrationTarget
from fastckpt.migrate.state import SamplingParams, StopCriteria, TokenState, step_seed

_LAZY: dict[str, tuple[str, str]] = {
    "RecomputeCostModel": ("fastckpt.migrate.costmodel", "RecomputeCostModel"),
    "fit_recompute": ("fastckpt.migrate.costmodel", "fit"),
    "predict_migration": ("fastckpt.migrate.costmodel", "predict_migration"),
    "RemoteTarget": ("fastckpt.migrate.remote", "RemoteTarget"),
    "TargetHost": ("fastckpt.migrate.remote", "TargetHost"),
    "SocketServer": ("fastckpt.migrate.transport", "SocketServer"),
    "SocketTransport": ("fastckpt.migrate.transport", "SocketTransport"),
    "Transport": ("fastckpt.migrate.transport", "Transport"),
    "ReferenceEngine": ("fastckpt.migrate.reference", "ReferenceEngine"),
    "VllmEngine": ("fastckpt.migrate.vllm", "VllmEngine"),
    "checkpoint_fingerprint": ("fastckpt.migrate.fingerprint", "checkpoint_fingerprint"),
    "model_fingerprint": ("fastckpt.migrate.fingerprint", "model_fingerprint"),
}

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.migrate.costmodel import RecomputeCostModel, predict_migration
    from fastckpt.migrate.costmodel import fit as fit_recompute
    from fastckpt.migrate.fingerprint import checkpoint_fingerprint, model_fingerprint
    from fastckpt.migrate.reference import ReferenceEngine
    from fastckpt.migrate.remote import RemoteTarget, TargetHost
    from fastckpt.migrate.transport import SocketServer, SocketTransport, Transport
    from fastckpt.migrate.vllm import VllmEngine


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastckpt.migrate' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = [
    "LeaseExpiredError",
    "MigrationError",
    "MigrationReport",
    "MigrationSource",
    "MigrationTarget",
    "ModelMismatchError",
    "Outcome",
    "RecomputeCostModel",
    "ReferenceEngine",
    "RemoteError",
    "RemoteTarget",
    "RoundInfo",
    "SamplingParams",
    "SocketServer",
    "SocketTransport",
    "SourceStateError",
    "StopCriteria",
    "TargetHost",
    "TargetStateError",
    "TokenState",
    "TokenStateChecksumError",
    "TokenStateError",
    "TokenStateVersionError",
    "Transport",
    "TransportError",
    "VllmEngine",
    "checkpoint_fingerprint",
    "fit_recompute",
    "migrate",
    "model_fingerprint",
    "predict_migration",
    "step_seed",
]
