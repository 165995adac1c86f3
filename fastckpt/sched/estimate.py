"""Startup-time estimates, migration plans and a deterministic server pick.

Arithmetic (all of it; see docs/sched.md):

- queue wait of a tier = queued loads x tier overhead + queued bytes / tier bandwidth; on a
  ``serial`` server (one load at a time, whatever the tier) the sum of that over every tier's
  queue, each at its own tier's speed;
- load time from a tier = queue wait + overhead + model bytes / bandwidth; the estimate uses the
  tier holding the model that gives the smallest load time ("fastest tier");
- migration cost of an instance = a + b*tokens + c*tokens^2 (the recompute model);
- when a server has fewer free GPUs than the model needs, the migration plan is the set of running
  instances that frees enough GPUs at the least total cost; the GPUs are freed first, then the
  load runs (no overlap is assumed, which errs on the slow side);
- startup time = migration cost + load time; servers are ranked by (startup time, number of
  migrated instances, server name), so equal estimates always resolve the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fastckpt.sched.model import (
    Instance,
    ModelSpec,
    RecomputeModel,
    SchedError,
    Server,
    TierQueue,
)

#: Above this many DP cells (candidates x GPUs to free) the plan is greedy (cheapest seconds per
#: freed GPU first, then instances that turned out unnecessary are dropped, costliest first).
#: Real servers (<= 16 GPUs, <= 16 instances) are always far below it, so plans there are exact.
EXACT_PLAN_CELLS = 200_000


@dataclass(frozen=True)
class LoadEstimate:
    """Time to load ``model`` on ``server`` from ``tier``, with its parts."""

    server: str
    model: str
    tier: str
    nbytes: int
    queue_wait_s: float
    overhead_s: float
    transfer_s: float
    bandwidth_bps: float
    queued_loads: int = 0
    queued_bytes: int = 0

    @property
    def total_s(self) -> float:
        return self.queue_wait_s + self.overhead_s + self.transfer_s

    @property
    def parts(self) -> dict[str, float]:
        return {
            "queue_wait_s": self.queue_wait_s,
            "overhead_s": self.overhead_s,
            "transfer_s": self.transfer_s,
        }

    def explain(self) -> str:
        return (
            f"load {self.model} on {self.server} from {self.tier}: "
            f"queue {self.queue_wait_s:.3f} s ({self.queued_loads} loads, "
            f"{self.queued_bytes / 1e9:.3f} GB ahead) + overhead {self.overhead_s:.3f} s + "
            f"{self.nbytes / 1e9:.3f} GB / {self.bandwidth_bps / 1e9:.3f} GB/s "
            f"= {self.transfer_s:.3f} s -> {self.total_s:.3f} s"
        )


@dataclass(frozen=True)
class MigrationPlan:
    """Running instances to migrate away so that a model fits, and what that costs."""

    instances: tuple[Instance, ...]
    costs_s: tuple[float, ...]
    need_gpus: int
    method: str  # "none" (nothing to free), "exact" (DP), "greedy" (stated heuristic)

    @property
    def cost_s(self) -> float:
        return sum(self.costs_s, 0.0)

    @property
    def freed_gpus(self) -> int:
        return sum(i.gpus for i in self.instances)

    def explain(self) -> str:
        if not self.instances:
            return "no migration needed"
        moves = ", ".join(
            f"{i.id} ({i.model}, {i.gpus} GPU, {i.tokens} tokens: {c:.3f} s)"
            for i, c in zip(self.instances, self.costs_s, strict=True)
        )
        return (
            f"migrate {len(self.instances)} instance(s) freeing {self.freed_gpus} GPU "
            f"(need {self.need_gpus}) [{self.method}]: {moves} -> {self.cost_s:.3f} s"
        )


@dataclass(frozen=True)
class StartEstimate:
    """Startup of ``model`` on ``server``: migration (if any) + load, or why it cannot start."""

    server: str
    model: str
    load: LoadEstimate | None
    migration: MigrationPlan | None
    reason: str = ""
    alternatives: tuple[LoadEstimate, ...] = field(default=(), compare=False)

    @property
    def feasible(self) -> bool:
        return self.load is not None and self.migration is not None

    @property
    def total_s(self) -> float:
        if self.load is None or self.migration is None:
            return float("inf")
        return self.migration.cost_s + self.load.total_s

    @property
    def parts(self) -> dict[str, float]:
        if not self.feasible:
            return {}
        assert self.load is not None and self.migration is not None
        return {"migration_s": self.migration.cost_s, **self.load.parts}

    def sort_key(self) -> tuple[float, int, str]:
        moved = len(self.migration.instances) if self.migration is not None else 0
        return (self.total_s, moved, self.server)

    def explain(self) -> str:
        if not self.feasible:
            return f"{self.model} cannot start on {self.server}: {self.reason}"
        assert self.load is not None and self.migration is not None
        return (
            f"{self.model} on {self.server}: {self.total_s:.3f} s = "
            f"migration {self.migration.cost_s:.3f} s + load {self.load.total_s:.3f} s\n"
            f"  {self.migration.explain()}\n  {self.load.explain()}"
        )


def load_estimates(server: Server, model: ModelSpec) -> list[LoadEstimate]:
    """One estimate per tier of ``server`` that holds ``model``, fastest first (ties: tier name)."""
    out = []
    ahead = server.queues.values() if server.serial else None
    for tier in server.tiers_holding(model.name):
        q = server.queue(tier.name)
        if ahead is not None:  # every load queued on the server, whatever its tier
            q = TierQueue(sum(x.loads for x in ahead), sum(x.nbytes for x in ahead))
        wait = server.queue_wait_s(tier.name)
        out.append(
            LoadEstimate(
                server=server.name,
                model=model.name,
                tier=tier.name,
                nbytes=model.nbytes,
                queue_wait_s=wait,
                overhead_s=tier.overhead_s,
                transfer_s=model.nbytes / tier.bandwidth_bps,
                bandwidth_bps=tier.bandwidth_bps,
                queued_loads=q.loads,
                queued_bytes=q.nbytes,
            )
        )
    out.sort(key=lambda e: (e.total_s, e.tier))
    return out


def _recompute_for(recompute: RecomputeModel | Mapping[str, RecomputeModel], model: str):
    if isinstance(recompute, RecomputeModel):
        return recompute
    found = recompute.get(model, recompute.get("*"))
    if found is None:
        raise SchedError(f"no recompute model for {model!r} (and no '*' default)")
    return found


def plan_migration(
    running: Iterable[Instance],
    need_gpus: int,
    recompute: RecomputeModel | Mapping[str, RecomputeModel],
    *,
    exact_cells: int = EXACT_PLAN_CELLS,
) -> MigrationPlan | None:
    """The cheapest set of ``running`` instances whose GPUs add up to at least ``need_gpus``.

    Exact (a 0/1 knapsack DP over GPUs freed, capped at ``need_gpus``) while candidates x
    ``need_gpus`` <= ``exact_cells``; above that a greedy heuristic (cheapest seconds per GPU
    first, then dropping instances no longer needed, costliest first). Equal-cost plans resolve
    to fewer freed GPUs, then fewer instances, then the smallest sorted tuple of ids, independent
    of the input order. Returns None if even migrating everything frees too few GPUs.
    """
    if need_gpus <= 0:
        return MigrationPlan((), (), max(need_gpus, 0), "none")
    cands = sorted((i for i in running if i.gpus > 0), key=lambda i: i.id)
    if sum(i.gpus for i in cands) < need_gpus:
        return None
    costs = [_recompute_for(recompute, i.model).cost_s(i.tokens) for i in cands]
    if len(cands) * need_gpus <= exact_cells:
        chosen = _plan_exact(cands, costs, need_gpus)
        method = "exact"
    else:
        chosen = _plan_greedy(cands, costs, need_gpus)
        method = "greedy"
    return MigrationPlan(
        tuple(cands[k] for k in chosen), tuple(costs[k] for k in chosen), need_gpus, method
    )


_Key = tuple[float, int, int, tuple[str, ...]]


def _plan_exact(cands: Sequence[Instance], costs: Sequence[float], need: int) -> list[int]:
    # best[g]: (key, chosen indices) of the best subset of the items seen so far freeing
    # min(freed, need) == g GPUs. Items are visited in id order, so sums are always accumulated
    # in that order and ties resolve the same way for any input order.
    best: list[tuple[_Key, tuple[int, ...]] | None] = [None] * (need + 1)
    best[0] = ((0.0, 0, 0, ()), ())
    for k, (inst, cost) in enumerate(zip(cands, costs, strict=True)):
        new = list(best)
        for g in range(need + 1):
            cur = best[g]
            if cur is None:
                continue
            (c, moved, count, ids), chosen = cur
            g2 = min(need, g + inst.gpus)
            cand: tuple[_Key, tuple[int, ...]] = (
                (c + cost, moved + inst.gpus, count + 1, (*ids, inst.id)),
                (*chosen, k),
            )
            if new[g2] is None or cand[0] < new[g2][0]:  # type: ignore[index]
                new[g2] = cand
        best = new
    final = best[need]
    assert final is not None  # guaranteed: enough GPUs in total
    return list(final[1])


def _plan_greedy(cands: Sequence[Instance], costs: Sequence[float], need: int) -> list[int]:
    order = sorted(range(len(cands)), key=lambda k: (costs[k] / cands[k].gpus, cands[k].id))
    chosen: list[int] = []
    freed = 0
    for k in order:
        if freed >= need:
            break
        chosen.append(k)
        freed += cands[k].gpus
    for k in sorted(chosen, key=lambda k: (-costs[k], cands[k].id)):
        if freed - cands[k].gpus >= need:
            chosen.remove(k)
            freed -= cands[k].gpus
    return sorted(chosen)


def brute_force_plan_cost(
    running: Sequence[Instance], need_gpus: int, recompute: RecomputeModel
) -> float | None:
    """Least total migration cost over every subset (reference for tests; exponential)."""
    if need_gpus <= 0:
        return 0.0
    best: float | None = None
    cands = sorted(running, key=lambda i: i.id)
    for r in range(len(cands) + 1):
        for combo in itertools.combinations(cands, r):
            if sum(i.gpus for i in combo) >= need_gpus:
                cost = sum((recompute.cost_s(i.tokens) for i in combo), 0.0)
                if best is None or cost < best:
                    best = cost
    return best


class Estimator:
    """Startup-time estimates for placing model starts; plain data in, plain data out.

    Args:
        recompute: migration cost model, one for all models or a mapping by model name (the
            key ``"*"`` is the default).
        migrate: consider freeing GPUs by migrating running instances. Without it a server
            with too few free GPUs cannot take the model.
        exact_cells: see ``plan_migration``.
    """

    def __init__(
        self,
        recompute: RecomputeModel | Mapping[str, RecomputeModel] | None = None,
        *,
        migrate: bool = True,
        exact_cells: int = EXACT_PLAN_CELLS,
    ) -> None:
        self.recompute = recompute if recompute is not None else RecomputeModel()
        self.migrate = migrate
        self.exact_cells = exact_cells

    def estimate(
        self, server: Server, model: ModelSpec, *, spare_gpus_elsewhere: int | None = None
    ) -> StartEstimate:
        """Startup time of ``model`` on ``server``, with its parts (or the reason it cannot start).

        ``spare_gpus_elsewhere`` (free GPUs on the other servers), when given, bounds how many
        GPUs a migration may move away: migrated instances must land somewhere.
        """
        loads = load_estimates(server, model)
        if not loads:
            return StartEstimate(server.name, model.name, None, None, "no tier holds the model")
        if model.gpus > server.gpus:
            return StartEstimate(
                server.name,
                model.name,
                None,
                None,
                f"needs {model.gpus} GPUs, server has {server.gpus}",
            )
        need = model.gpus - server.free_gpus
        if need > 0 and not self.migrate:
            return StartEstimate(
                server.name,
                model.name,
                None,
                None,
                f"needs {model.gpus} GPUs, {server.free_gpus} free (migration off)",
            )
        plan = plan_migration(server.running, need, self.recompute, exact_cells=self.exact_cells)
        if plan is None:
            return StartEstimate(
                server.name,
                model.name,
                None,
                None,
                f"needs {need} more GPUs than migrating every running instance frees",
            )
        if spare_gpus_elsewhere is not None and plan.freed_gpus > spare_gpus_elsewhere:
            return StartEstimate(
                server.name,
                model.name,
                None,
                None,
                f"migration moves {plan.freed_gpus} GPUs but only {spare_gpus_elsewhere} are "
                "free elsewhere",
            )
        return StartEstimate(server.name, model.name, loads[0], plan, "", tuple(loads[1:]))

    def rank(self, servers: Sequence[Server], model: ModelSpec) -> list[StartEstimate]:
        """Every server's estimate, best first; infeasible ones last (by name)."""
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise SchedError("server names must be unique")
        total_free = sum(s.free_gpus for s in servers)
        out = [
            self.estimate(s, model, spare_gpus_elsewhere=total_free - s.free_gpus)
            if self.migrate
            else self.estimate(s, model)
            for s in servers
        ]
        out.sort(key=StartEstimate.sort_key)
        return out

    def pick(self, servers: Sequence[Server], model: ModelSpec) -> StartEstimate:
        """The best server for ``model``; raises SchedError if none can take it."""
        if not servers:
            raise SchedError("no servers to pick from")
        best = self.rank(servers, model)[0]
        if not best.feasible:
            raise SchedError(f"no server can start {model.name}: {best.reason}")
        return best


#: Starts within this much of the fastest one count as equally fast for ``prefer_room``.
NEAR_REL = 0.05
NEAR_ABS_S = 0.05


def prefer_room(
    ranked: Sequence[StartEstimate],
    servers: Sequence[Server],
    *,
    rel: float = NEAR_REL,
    abs_s: float = NEAR_ABS_S,
) -> list[StartEstimate]:
    """``ranked`` (``Estimator.rank``'s order) with the starts that are nearly as fast as the
    fastest (within ``rel`` of it plus ``abs_s``) reordered by free room first: most
    ``free_gpus``, then estimate, then name. For servers that make room by evicting what they
    hold (a multiplexed replica drops its least recently used model), a start where room is free
    evicts nothing that a later request may need again; between starts that differ by more than
    the tolerance, speed decides."""
    feasible = [e for e in ranked if e.feasible]
    if not feasible:
        return list(ranked)
    free = {s.name: s.free_gpus for s in servers}
    limit = feasible[0].total_s * (1 + rel) + abs_s
    near = [e for e in feasible if e.total_s <= limit]
    near.sort(key=lambda e: (-free.get(e.server, 0), e.total_s, e.server))
    rest = [e for e in ranked if e not in near]
    return near + rest
