"""Ray Serve integration: a request router that starts models where they start soonest.

Ray Serve routes a request for a multiplexed model (``handle.options(multiplexed_model_id=...)``)
to one of a deployment's replicas; a replica that does not hold the model loads it first, so the
routing decision *is* the placement of a model start. ``StartTimeRouter`` (a public Ray Serve
``RequestRouter``) makes that decision with ``fastckpt.sched.Estimator``:

- each replica reports its server's state as routing stats (``record_routing_stats`` returning
  the ``fastckpt.sched.wire`` dict: tiers with calibrated speeds, which tier holds which model,
  queued loads; ``fastckpt.integrations.ray_serve`` builds it from a replica's real tiers);
- replicas where the model is resident, loading or queued (Ray Serve's own model ids and the
  stats' ``resident`` / ``loading`` / ``queued``), or where another router just reserved its
  start, come first: no second start is needed;
- otherwise every replica with known state in the estimator's order (startup time, migrations,
  name; starts within 5% + 50 ms of the fastest count as equally fast and go to the replica with
  the most free model slots first, ``prefer_room``: it evicts nothing), after adding the live
  reservations of other starts to their load queues; the router
  reserves the start on the first one (``fastckpt.sched.reserve``: compare-and-set, so routers
  that ranked on the same state do not all pick the same replica); then replicas whose state is
  not known yet.

Configure it with ``RequestRouterConfig(request_router_class=StartTimeRouter,
request_router_kwargs={"models": {name: {"nbytes": ..., "gpus": ...}}, "recompute": {...},
"reservations": "actor"})``. ``reservations`` is ``"actor"`` (default: one named Ray actor per
deployment shared by every router, i.e. every proxy and handle), ``"local"`` (this router only) or
``"off"``; ``reservation_ttl_s`` (default 3 s) should exceed the routing stats period.
Each decision (with the estimate's explanation) is appended to ``fastckpt.sched.wire.DECISIONS``
in the process that routes (the one holding the handle), and each replica's latest stats as the
router received them (when reported, when received, what it held) are in
``fastckpt.sched.wire.VIEWS``.
Requires ``ray[serve]`` (the ``ray`` extra: ``pip install ".[ray]"`` from a clone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from fastckpt.sched import wire
from fastckpt.sched.estimate import Estimator, prefer_room
from fastckpt.sched.model import ModelSpec, RecomputeModel, SchedError
from fastckpt.sched.reserve import (
    DEFAULT_TTL_S,
    Claim,
    ReservationBook,
    apply_reservations,
    starting,
)
from fastckpt.sched.wire import server_from_dict

DECISIONS = wire.DECISIONS
RESERVATION_MODES = ("actor", "local", "off")
#: Longest wait for the shared reservation book; past it the router decides without it.
BOOK_TIMEOUT_S = 2.0
CLAIM_ATTEMPTS = 3
NAMESPACE = "fastckpt"

logger = logging.getLogger("fastckpt.sched.ray_serve")


def replica_name(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


def reported_models(stats: Mapping[str, Any]) -> set[str]:
    """Models a replica's routing stats show resident, loading or queued."""
    out = {str(m) for m in stats.get("resident", ())}
    for key in ("loading", "queued"):
        for item in stats.get(key, ()):
            if isinstance(item, Mapping) and "model" in item:
                out.add(str(item["model"]))
    return out


@ray.remote(num_cpus=0, max_restarts=-1)
class ReservationActor:
    """A ``ReservationBook`` shared by every router of a deployment (one per name)."""

    def __init__(self, ttl_s: float) -> None:
        self.book = ReservationBook(ttl_s)

    def snapshot(self) -> Claim:
        return self.book.snapshot()

    def claim(
        self, server: str, model: str, tier: str, nbytes: int, version: int, owner: str
    ) -> Claim:
        return self.book.claim(server, model, tier, nbytes, version=version, owner=owner)

    def release(self, server: str, model: str) -> bool:
        return self.book.release(server, model)

    def counts(self) -> dict[str, int]:
        return {"claims": self.book.claims, "conflicts": self.book.conflicts}


class _Book:
    """The reservation book a router uses: a shared actor (``actor``), this router's own
    (``local``), or none (``off``).

    The shared book is asked only once its actor answered a first call, made when the router
    starts (``warm``); until then, and after a call that failed or took longer than
    ``BOOK_TIMEOUT_S``, the router keeps its own book, so that a burst arriving while the actor
    starts (seconds on a busy machine) is still spread, and no decision waits on it."""

    def __init__(self, mode: str, ttl_s: float, name: str) -> None:
        if mode not in RESERVATION_MODES:
            raise SchedError(f"reservations={mode!r}: expected one of {RESERVATION_MODES}")
        self.mode = mode
        self.ttl_s = ttl_s
        self.name = name
        self.local = ReservationBook(ttl_s) if mode != "off" else None
        self._actor: Any = None
        self._warming: Any = None  # a concurrent.futures.Future of the actor's first answer
        self.shared_ready = False
        self.owner = f"{os.getpid()}-{id(self):x}"

    def _handle(self) -> Any:
        if self._actor is None:
            self._actor = ReservationActor.options(  # type: ignore[attr-defined]
                name=self.name, namespace=NAMESPACE, get_if_exists=True
            ).remote(self.ttl_s)
        return self._actor

    def warm(self) -> None:
        """Create (or find) the shared actor and ask it once, without waiting for the answer."""
        if self.mode != "actor" or self._warming is not None:
            return
        try:
            self._warming = self._handle().counts.remote().future()
        except Exception as exc:  # no Ray here: the router's own book
            logger.warning("reservation book %s not started (%r)", self.name, exc)

    def _shared(self) -> bool:
        """Whether the shared book answers now (never waits)."""
        if self.shared_ready or self.mode != "actor":
            return self.shared_ready
        if self._warming is None:
            self.warm()
            return False
        if not self._warming.done():
            return False
        if self._warming.exception() is None:
            self.shared_ready = True
        else:
            self._warming, self._actor = None, None  # asked again on the next decision
        return self.shared_ready

    async def _remote(self, method: str, *args: Any) -> Claim | None:
        try:
            result: Claim = await asyncio.wait_for(
                getattr(self._handle(), method).remote(*args), BOOK_TIMEOUT_S
            )
            return result
        except Exception as exc:  # the book is an optimisation: route on this router's own
            logger.warning(
                "reservation book %s unavailable (%r): this router's own book until it answers",
                self.name,
                exc,
            )
            self.shared_ready, self._warming, self._actor = False, None, None
            return None

    async def snapshot(self) -> tuple[Claim | None, bool]:
        """The reservations now and whether they come from the shared book (claim there)."""
        if self.local is None:
            return None, False
        if self._shared():
            snap = await self._remote("snapshot")
            if snap is not None:
                return snap, True
        return self.local.snapshot(), False

    async def claim(
        self, server: str, model: str, tier: str, nbytes: int, version: int, shared: bool
    ) -> Claim | None:
        """Claim a start in the book the snapshot came from (None: that book is gone)."""
        if self.local is None:
            return None
        if shared:
            return await self._remote("claim", server, model, tier, nbytes, version, self.owner)
        return self.local.claim(server, model, tier, nbytes, version=version, owner=self.owner)


class StartTimeRouter(RequestRouter):
    """Routes each request to the replica where its model starts soonest (see module doc).

    No ``FIFOMixin``: a replica chosen for a request goes to that very request (Ray Serve's
    default matching), never to an older request of another model, so the start happens where
    it was placed and reserved."""

    def initialize_state(
        self,
        models: Mapping[str, Mapping[str, int]] | None = None,
        recompute: Mapping[str, Any] | None = None,
        migrate: bool = True,
        reservations: str = "actor",
        reservation_ttl_s: float = DEFAULT_TTL_S,
        reservations_name: str = "",
        **_: Any,
    ) -> None:
        self._models = {
            name: ModelSpec(name, int(spec["nbytes"]), int(spec.get("gpus", 1)))
            for name, spec in (models or {}).items()
        }
        rc = RecomputeModel.from_dict(recompute) if recompute else RecomputeModel()
        self._estimator = Estimator(rc, migrate=migrate)
        name = reservations_name or f"start-reservations-{_deployment_key(self)}"
        self._book = _Book(reservations, float(reservation_ttl_s), name)
        self._book.warm()  # the shared actor starts now, not in the first burst's decisions

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve hands the router its replicas whenever they or their stats change; keep
        what each reported in ``fastckpt.sched.wire.VIEWS`` with the time it arrived."""
        super().update_replicas(replicas)
        from fastckpt.sched import wire as shared

        now = time.time()
        names = set()
        for r in replicas:
            name = replica_name(r)
            names.add(name)
            stats = r.routing_stats
            if stats:
                old = shared.VIEWS.get(name)
                view = _view(stats)
                if old is None or old["at"] != view["at"]:
                    shared.VIEWS[name] = {**view, "received": now}
        for name in getattr(self, "_viewed", set()) - names:
            shared.VIEWS.pop(name, None)
        self._viewed = names

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
        visible: dict[str, set[str]] = {}
        for name, r in by_name.items():
            stats = r.routing_stats or {}
            visible[name] = set(r.multiplexed_model_ids) | reported_models(stats)
        warm = sorted(n for n in by_name if model_id in visible[n])
        snap, shared = await self._book.snapshot() if not warm else (None, False)
        reserved = (
            [n for n in starting(snap.reservations, model_id) if n in by_name] if snap else []
        )
        decision: dict[str, Any] = {"model": model_id, "warm": warm, "underway": reserved}
        decision["book"] = "shared" if shared else ("local" if snap is not None else "none")
        if warm or reserved:
            first = warm + [n for n in reserved if n not in warm]
            rest = sorted(n for n in by_name if n not in first)
            decision.update(chosen=first[0], ranking=[], explain=[], unknown=[], errors={})
            decision.update(complete=True, reserved=None)
            _log(decision)
            return (
                [[by_name[n] for n in first], [by_name[n] for n in rest]]
                if rest
                else [[by_name[n] for n in first]]
            )
        order, tail, ranked, unknown, errors, claimed = await self._rank(
            by_name, model, visible, snap, shared
        )
        decision.update(
            chosen=(order + tail)[0] if order or tail else None,
            ranking=[(e.server, e.total_s) for e in ranked],
            explain=[e.explain() for e in ranked],
            unknown=unknown,
            errors=errors,
            complete=not unknown,
            reserved=claimed,
        )
        _log(decision)
        ranks = [[by_name[n]] for n in order]
        if tail:
            ranks.append([by_name[n] for n in tail])
        return ranks

    async def _rank(
        self,
        by_name: Mapping[str, RunningReplica],
        model: ModelSpec,
        visible: Mapping[str, Iterable[str]],
        snap: Claim | None,
        shared: bool,
    ) -> tuple[list[str], list[str], list[Any], list[str], dict[str, str], str | None]:
        servers, unknown, errors = [], [], {}
        for name, r in sorted(by_name.items()):
            stats = r.routing_stats
            if not stats:
                unknown.append(name)
                continue
            try:
                servers.append(server_from_dict(name, stats))
            except SchedError as exc:
                errors[name] = str(exc)
                unknown.append(name)
        ranked: list[Any] = []
        claimed: str | None = None
        for _ in range(CLAIM_ATTEMPTS):
            view = apply_reservations(servers, snap.reservations, visible) if snap else servers
            ranked = prefer_room(self._estimator.rank(view, model), view) if view else []
            best = next((e for e in ranked if e.feasible), None)
            if best is None or snap is None or best.load is None:
                break
            got = await self._book.claim(
                best.server, model.name, best.load.tier, model.nbytes, snap.version, shared
            )
            if got is None or got.ok:
                claimed = best.server if got is not None else None
                break
            taken = [n for n in starting(got.reservations, model.name) if n in by_name]
            if taken:  # another router reserved this very start meanwhile: join it
                rest = [e.server for e in ranked if e.server != taken[0]]
                return [taken[0]], rest + unknown, ranked, unknown, errors, None
            snap = got
        order = [e.server for e in ranked if e.feasible]
        tail = [e.server for e in ranked if not e.feasible] + unknown
        return order, tail, ranked, unknown, errors, claimed


def _deployment_key(router: Any) -> str:
    """app-deployment of the router's deployment (Ray passes it to every router)."""
    dep = getattr(router, "_deployment_id", None)
    if dep is None:
        return "default"
    return f"{getattr(dep, 'app_name', '')}-{getattr(dep, 'name', '')}"


def _view(stats: Mapping[str, Any]) -> dict[str, Any]:
    """What ``VIEWS`` keeps of one replica's stats: when it reported, and what it held."""
    return {
        "at": stats.get("at"),
        "resident": list(stats.get("resident", ())),
        "holds": dict(stats.get("holds", {})),
        "loading": [i.get("model") for i in stats.get("loading", ()) if isinstance(i, Mapping)],
    }


def _log(decision: dict[str, Any]) -> None:
    # Ray may ship this class by value, with its own copy of module globals: look the log up
    # through the imported module so that every router of the process shares one.
    from fastckpt.sched import wire as shared

    decision["at"] = time.time()
    shared.DECISIONS.append(decision)
