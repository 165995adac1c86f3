"""Ray Serve integration: a request router that starts models where they start soonest.

Ray Serve routes a request for a multiplexed model (``handle.options(multiplexed_model_id=...)``)
to one of a deployment's replicas; a replica that does not hold the model loads it first, so the
routing decision *is* the placement of a model start. ``StartTimeRouter`` (a public Ray Serve
``RequestRouter``) makes that decision with ``fastckpt.sched.Estimator``:

- each replica reports its server's state as routing stats (``record_routing_stats`` returning
  ``fastckpt.sched.wire.server_to_dict(...)``: tiers with calibrated speeds, which tier holds which
  model, queued loads, GPUs, running instances);
- replicas that already serve the model come first (no start needed), then every replica with
  known state in the estimator's order (startup time, migrations, name), then replicas whose state
  is not known yet.

Configure it with ``RequestRouterConfig(request_router_class=StartTimeRouter,
request_router_kwargs={"models": {name: {"nbytes": ..., "gpus": ...}}, "recompute": {...}})``.
Each decision (with the estimate's explanation) is appended to ``fastckpt.sched.wire.DECISIONS``
in the process that routes (the one holding the handle).
Requires ``ray[serve]`` (the ``ray`` extra: ``pip install ".[ray]"`` from a clone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from fastckpt.sched import wire
from fastckpt.sched.estimate import Estimator
from fastckpt.sched.model import ModelSpec, RecomputeModel, SchedError
from fastckpt.sched.wire import server_from_dict

DECISIONS = wire.DECISIONS


def replica_name(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


class StartTimeRouter(FIFOMixin, RequestRouter):
    """Routes each request to the replica where its model starts soonest (see module doc)."""

    def initialize_state(
        self,
        models: Mapping[str, Mapping[str, int]] | None = None,
        recompute: Mapping[str, Any] | None = None,
        migrate: bool = True,
        **_: Any,
    ) -> None:
        self._models = {
            name: ModelSpec(name, int(spec["nbytes"]), int(spec.get("gpus", 1)))
            for name, spec in (models or {}).items()
        }
        rc = RecomputeModel.from_dict(recompute) if recompute else RecomputeModel()
        self._estimator = Estimator(rc, migrate=migrate)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        model = self._models.get(model_id)
        if model is None:  # not a model start: Ray Serve's usual choice among all
            return [candidate_replicas]
        by_name = {replica_name(r): r for r in candidate_replicas}
        warm = sorted(n for n, r in by_name.items() if model_id in r.multiplexed_model_ids)
        servers, unknown, errors = [], [], {}
        for name, r in sorted(by_name.items()):
            if name in warm:
                continue
            stats = r.routing_stats
            if not stats:
                unknown.append(name)
                continue
            try:
                servers.append(server_from_dict(name, stats))
            except SchedError as exc:
                errors[name] = str(exc)
                unknown.append(name)
        ranked = self._estimator.rank(servers, model) if servers else []
        order = warm + [e.server for e in ranked if e.feasible]
        tail = [e.server for e in ranked if not e.feasible] + unknown
        # Ray may ship this class by value, with its own copy of module globals: look the log up
        # through the imported module so that every router of the process shares one.
        from fastckpt.sched import wire as shared

        shared.DECISIONS.append(
            {
                "model": model_id,
                "chosen": (order + tail)[0] if order or tail else None,
                "warm": warm,
                "ranking": [(e.server, e.total_s) for e in ranked],
                "explain": [e.explain() for e in ranked],
                "unknown": unknown,
                "errors": errors,
                "complete": not unknown,
            }
        )
        ranks = [[by_name[n]] for n in order]
        if tail:
            ranks.append([by_name[n] for n in tail])
        return ranks
