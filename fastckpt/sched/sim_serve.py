"""Simulator of a multiplexed Ray Serve deployment: the prediction a real run is checked against.

``fastckpt.sched.sim`` models a large GPU cluster with instances, keep-alive and migration. A Ray
Serve deployment of ``fastckpt.integrations.ray_serve`` works differently, and this module models
exactly that (event-driven, pure Python, seeded):

- replicas, one per node, each with ``slots`` resident models (Ray Serve's multiplexed LRU cache:
  a start evicts the least recently used model when the cache is full, before it loads);
- Ray Serve's multiplexer, request by request: a request whose model is resident runs at once;
  any other waits for the replica's model lock, first come first served, and when its turn
  comes takes the model if it is resident by then (a load another request made), else evicts
  the least recently used model when the cache is full and loads its own: so requests for a
  model that is loading join that load only if no other model's load comes between them (with
  one slot, requests alternating between two models reload both, as Ray Serve does). A load
  reads from the fastest tier holding the model (``dram``, ``ssd``, else ``remote``) and takes
  ``overhead_s + bytes / bandwidth_bps`` of that tier;
- after a load the replica's DRAM tier holds the checkpoint and, after a ``remote`` load, its
  SSD tier holds the converted copy (each LRU under its byte budget; a checkpoint larger than a
  budget bypasses it; hits refresh recency); a replica without tiers (``dram_bytes`` and
  ``ssd_bytes`` 0, only a ``remote`` tier) keeps nothing;
- a request runs as token steps on its replica, first come first served over ``step_workers``
  threads (unlimited by default): the prefill and first token (``first_token_s``), then one step
  per further token (``per_token_s``), each step queued behind the steps of other requests
  waiting then; every request also pays ``overhead_s``, the serving system's own cost
  (routing, calls, streaming);
- the replicas share a ``Machine``'s cores, and a replica's running jobs share its process (one
  interpreter lock, one torch thread): processor sharing at both levels (off by default; see
  ``Machine``); where a ``CoRun`` is given for the tier a replica loads from, its load and its
  token steps share the replica as measured instead of equally (a load that holds the
  interpreter lock or faults pages in stalls the steps far more than it is slowed by them);
- routing, on the state at the request's arrival (real routers see reports up to one period
  old): ``default`` is Ray Serve's own router for multiplexed requests (replicas whose model ids
  include the model, else those with the fewest models, else all; two picked at random, the one
  with fewer requests in flight wins; replicas at ``max_ongoing`` requests are skipped), its
  view of the replicas' model ids ``ids_lag_s`` old (a replica pushes them every 0.1 s to Ray
  Serve's controller, which passes them on to the routers), and
  ``start-time`` is ``StartTimeRouter`` (replicas with the model resident, loading or queued,
  fewest requests in flight first; else the estimator's pick on each replica's tiers, holdings
  and serial load queue, nearly equal starts going where a slot is free: ``prefer_room``).

The result has each request's time to first token, whether it waited for a start, and the loads
per tier, with mean, p50 and p99.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastckpt.sched.estimate import Estimator, prefer_room
from fastckpt.sched.model import ModelSpec, SchedError, Server, TierQueue, TierSpeed
from fastckpt.sched.sim import TraceParams, make_trace

POLICIES = ("default", "start-time")
TIERS = ("dram", "ssd", "remote")
NO_IDS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica: its tier speeds (``remote`` required), resident slots and tier budgets."""

    name: str
    tiers: tuple[TierSpeed, ...]
    slots: int
    dram_bytes: int = 0
    ssd_bytes: int = 0

    def __post_init__(self) -> None:
        names = {t.name for t in self.tiers}
        if "remote" not in names or not names <= set(TIERS):
            raise SchedError(f"replica {self.name!r}: tiers must include remote, within {TIERS}")
        if self.slots < 1:
            raise SchedError(f"replica {self.name!r}: slots must be >= 1")
        if self.dram_bytes < 0 or self.ssd_bytes < 0:
            raise SchedError(f"replica {self.name!r}: budgets must be >= 0")

    def tier(self, name: str) -> TierSpeed:
        return next(t for t in self.tiers if t.name == name)


@dataclass(frozen=True)
class ServeRequest:
    t: float
    model: str
    tokens: int


@dataclass(frozen=True)
class ComputeCost:
    """Seconds from a resident model to its first token, and per further token."""

    first_token_s: float
    per_token_s: float = 0.0


@dataclass(frozen=True)
class ServeSimResult:
    policy: str
    ttft_s: tuple[float, ...]
    waited: tuple[bool, ...]
    replica: tuple[str, ...]
    loads: Mapping[str, int]
    seed: int = 0

    def summary(self) -> dict[str, Any]:
        return summarise(self.ttft_s, self.waited, self.loads)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile by the nearest-rank method (``q`` in (0, 1])."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarise(
    ttft: Sequence[float], waited: Sequence[bool], loads: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "requests": len(ttft),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else 0.0,
        "p50_ttft_s": percentile(ttft, 0.5),
        "p99_ttft_s": percentile(ttft, 0.99),
        "waited": sum(bool(w) for w in waited),
        "loads": {t: int(loads.get(t, 0)) for t in TIERS},
    }


@dataclass(frozen=True)
class Machine:
    """The CPUs the replicas share (several emulated nodes on one machine, or one node's cores
    shared by its replica's loads and token steps).

    Processor sharing at two levels. A replica is one process whose Python work (a load's
    bookkeeping and copies, a small model's forward pass) runs under one interpreter lock and,
    by default, one torch thread: it uses at most ``replica_cores`` cores, shared equally by its
    running jobs. The machine's ``cores`` are shared by the replicas that have work and the
    ``background`` scheduling groups of everything else that wants a CPU, as Linux's fair
    scheduler shares them (with autogroup, each session is one group and each emulated node
    runs in a session of its own; without it, each thread): a replica gets
    ``min(replica_cores, cores / (busy replicas + background))``. Calibration measured each job
    alone in one process beside ``calibration_background`` groups; its time is converted to
    work at that share.
    ``cores=None`` (default) means no sharing: every job runs at its calibrated speed.
    """

    cores: float | None = None
    background: float = 0.0
    calibration_background: float = 0.0
    replica_cores: float = 1.0

    def share(self, busy: int, background: float | None = None) -> float:
        """Cores one busy replica gets while ``busy`` replicas have work."""
        if self.cores is None or busy <= 0:
            return self.replica_cores
        bg = self.background if background is None else background
        return min(self.replica_cores, self.cores / (busy + bg))

    def work(self, seconds: float) -> float:
        """Work (seconds at ``replica_cores``) of a job calibrated at ``seconds``."""
        return seconds * self.share(1, self.calibration_background) / self.replica_cores


@dataclass(frozen=True)
class CoRun:
    """How a start and the token steps of one replica slow each other, measured in one process
    (``fastckpt.bench.serverless_prep``): while both run, the load takes ``load_slowdown``
    times its time alone and each step ``step_slowdown`` times its time alone (the steps
    share that between them). Equal processor sharing of one core is ``CoRun(2, 2)``."""

    step_slowdown: float
    load_slowdown: float

    def __post_init__(self) -> None:
        if not (self.step_slowdown >= 1.0 and self.load_slowdown >= 1.0):
            raise SchedError(f"co-run slowdowns must be >= 1, got {self}")


@dataclass
class _Job:
    replica: _Rep
    kind: str  # load | step
    work: float
    left: float
    model: str = ""
    request: int = -1
    step: int = 0


@dataclass
class _Rep:
    spec: ReplicaSpec
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    dram: OrderedDict[str, int] = field(default_factory=OrderedDict)
    ssd: OrderedDict[str, int] = field(default_factory=OrderedDict)
    # requests waiting for the model lock, in order: (model, request index)
    queue: list[tuple[str, int]] = field(default_factory=list)
    load: _Job | None = None
    load_tier: str = ""
    steps: list[tuple[int, int]] = field(default_factory=list)  # (request, step) waiting, FIFO
    running_steps: int = 0
    ongoing: int = 0
    # (time, model ids from then on): what routers see, ``ids_lag_s`` late
    ids_log: list[tuple[float, frozenset[str]]] = field(default_factory=lambda: [(0.0, NO_IDS)])

    @property
    def loading(self) -> str | None:
        return self.load.model if self.load is not None else None

    def ids(self) -> set[str]:
        """Ray Serve's model ids of the replica: resident, loading and queued."""
        out = set(self.resident) | {m for m, _ in self.queue}
        if self.load is not None:
            out.add(self.load.model)
        return out

    def note_ids(self, now: float) -> None:
        ids = frozenset(self.ids())
        if ids != self.ids_log[-1][1]:
            self.ids_log.append((now, ids))

    def ids_at(self, t: float) -> frozenset[str]:
        """The model ids the replica had at time ``t``."""
        seen = self.ids_log[0][1]
        for at, ids in reversed(self.ids_log):
            if at <= t:
                seen = ids
                break
        return seen


class ServeSimulation:
    """One policy over one trace (see the module docstring)."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        models: Mapping[str, int],
        trace: Sequence[ServeRequest],
        policy: str,
        compute: ComputeCost | Mapping[str, ComputeCost],
        *,
        max_ongoing: int = 8,
        overhead_s: float = 0.0,
        machine: Machine | None = None,
        step_workers: int | None = None,
        corun: Mapping[str, CoRun] | None = None,
        ids_lag_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise SchedError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        names = [r.name for r in replicas]
        if not replicas or len(set(names)) != len(names):
            raise SchedError("replicas must be non-empty with unique names")
        unknown = sorted({r.model for r in trace} - set(models))
        if unknown:
            raise SchedError(f"the trace names models without a size: {unknown}")
        if step_workers is not None and step_workers < 1:
            raise SchedError("step_workers must be >= 1 (or None: unlimited)")
        if not ids_lag_s >= 0:
            raise SchedError(f"ids_lag_s must be >= 0, got {ids_lag_s}")
        self.reps = [_Rep(r) for r in replicas]
        self.models = dict(models)
        self.trace = list(trace)
        self.policy = policy
        self.compute = compute
        self.max_ongoing = max_ongoing
        self.overhead_s = overhead_s
        self.machine = machine or Machine()
        self.step_workers = step_workers
        self.corun = dict(corun or {})
        self.ids_lag_s = ids_lag_s
        self.seed = seed
        self.rng = random.Random(f"serve-{seed}-{policy}")
        self.estimator = Estimator(migrate=False)
        self.arrivals = sorted(range(len(self.trace)), key=lambda i: (self.trace[i].t, i))
        self.jobs: list[_Job] = []
        self.now = 0.0
        self.ttft = [math.nan] * len(self.trace)
        self.waited = [False] * len(self.trace)
        self.where = [""] * len(self.trace)
        self.loads = dict.fromkeys(TIERS, 0)

    def _cost(self, model: str) -> ComputeCost:
        if isinstance(self.compute, ComputeCost):
            return self.compute
        return self.compute[model]

    # ------------------------------------------------------------------ routing
    def _pow2(self, cands: list[_Rep]) -> _Rep:
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        return a if a.ongoing <= b.ongoing else b

    def _route(self, model: str) -> _Rep:
        free = [r for r in self.reps if r.ongoing < self.max_ongoing] or self.reps
        if self.policy == "default":
            seen = {id(r): r.ids_at(self.now - self.ids_lag_s) for r in free}
            warm = [r for r in free if model in seen[id(r)]]
            if warm:
                return self._pow2(warm)
            fewest = min(len(seen[id(r)]) for r in free)
            return self._pow2([r for r in free if len(seen[id(r)]) == fewest])
        warm = [r for r in free if model in r.ids()]
        if warm:
            return min(warm, key=lambda r: (r.ongoing, r.spec.name))
        spec = ModelSpec(model, self.models[model], 0)
        servers = [self._server(r) for r in free]
        ranked = prefer_room(self.estimator.rank(servers, spec), servers)
        by_name = {r.spec.name: r for r in free}
        return by_name[ranked[0].server]

    def _server(self, r: _Rep) -> Server:
        queues: dict[str, TierQueue] = {}

        def add(tier: str, nbytes: int) -> None:
            q = queues.get(tier, TierQueue())
            queues[tier] = TierQueue(q.loads + 1, q.nbytes + nbytes)

        if r.load is not None:
            done = 1.0 - r.load.left / r.load.work if r.load.work > 0 else 1.0
            add(r.load_tier, max(0, int(self.models[r.load.model] * (1.0 - done))))
        for m in dict.fromkeys(m for m, _ in r.queue):  # each model waiting, once
            if m not in r.resident and m != r.loading:
                add(self._tier_for(r, m), self.models[m])
        return Server(
            name=r.spec.name,
            tiers=r.spec.tiers,
            gpus=r.spec.slots,
            free_gpus=max(0, r.spec.slots - len(r.ids())),
            holds={"dram": frozenset(r.dram), "ssd": frozenset(r.ssd)},
            queues=queues,
            everywhere=frozenset({"remote"}),
            serial=True,
        )

    # ------------------------------------------------------------------ replicas
    def _tier_for(self, r: _Rep, model: str) -> str:
        if model in r.dram:
            return "dram"
        if model in r.ssd:
            return "ssd"
        return "remote"

    def _keep(self, cache: OrderedDict[str, int], budget: int, model: str) -> None:
        nbytes = self.models[model]
        if nbytes > budget:
            return
        cache[model] = nbytes
        cache.move_to_end(model)
        while sum(cache.values()) > budget:
            cache.popitem(last=False)

    def _next_load(self, r: _Rep) -> None:
        """The model lock passes to the next waiting request: it takes its model if resident,
        else starts its load."""
        while r.load is None and r.queue:
            model, i = r.queue.pop(0)
            if model in r.resident:  # loaded by a request ahead of it, not evicted since
                r.resident.move_to_end(model)
                self._enqueue_step(r, i, 0)
                continue
            if len(r.resident) >= r.spec.slots:
                r.resident.popitem(last=False)  # Ray Serve evicts its LRU model before loading
            tier = self._tier_for(r, model)
            work = self.machine.work(r.spec.tier(tier).load_s(self.models[model]))
            r.load = _Job(r, "load", work, work, model=model, request=i)
            r.load_tier = tier
            self.jobs.append(r.load)

    def _enqueue_step(self, r: _Rep, i: int, step: int) -> None:
        r.steps.append((i, step))
        self._next_steps(r)

    def _next_steps(self, r: _Rep) -> None:
        while r.steps and (self.step_workers is None or r.running_steps < self.step_workers):
            i, step = r.steps.pop(0)
            cost = self._cost(self.trace[i].model)
            seconds = cost.first_token_s if step == 0 else cost.per_token_s
            work = self.machine.work(seconds)
            r.running_steps += 1
            self.jobs.append(_Job(r, "step", work, work, request=i, step=step))

    def _loaded(self, r: _Rep) -> None:
        assert r.load is not None
        model, tier, i = r.load.model, r.load_tier, r.load.request
        r.load = None
        self.loads[tier] += 1
        r.resident[model] = None
        if r.spec.dram_bytes:
            self._keep(r.dram, r.spec.dram_bytes, model)
        if r.spec.ssd_bytes and tier != "dram":
            self._keep(r.ssd, r.spec.ssd_bytes, model)
        elif model in r.ssd:
            r.ssd.move_to_end(model)
        self._enqueue_step(r, i, 0)
        self._next_load(r)

    def _stepped(self, job: _Job) -> None:
        r, i = job.replica, job.request
        r.running_steps -= 1
        if job.step == 0:
            self.ttft[i] = self.now - self.trace[i].t + self.overhead_s
        if job.step + 1 < max(1, self.trace[i].tokens):
            r.steps.append((i, job.step + 1))
        else:
            r.ongoing -= 1
        self._next_steps(r)

    def _arrive(self, i: int) -> _Rep:
        model = self.trace[i].model
        r = self._route(model)
        r.ongoing += 1
        self.where[i] = r.spec.name
        if model in r.resident:
            r.resident.move_to_end(model)
            self._enqueue_step(r, i, 0)
            return r
        self.waited[i] = True
        r.queue.append((model, i))
        self._next_load(r)
        return r

    def _rates(self) -> dict[int, float]:
        """Progress per second of each running job (see ``Machine`` and ``CoRun``)."""
        per: dict[int, list[_Job]] = {}
        for j in self.jobs:
            per.setdefault(id(j.replica), []).append(j)
        shared = self.machine.cores is not None
        base = self.machine.share(len(per)) / self.machine.replica_cores if shared else 1.0
        rates: dict[int, float] = {}
        for jobs in per.values():
            r = jobs[0].replica
            co = self.corun.get(r.load_tier) if r.load is not None else None
            steps = [j for j in jobs if j.kind == "step"]
            if co is not None and steps and r.load is not None:
                rates[id(r.load)] = base / co.load_slowdown
                for j in steps:
                    rates[id(j)] = base / (co.step_slowdown * len(steps))
            else:
                each = base / len(jobs) if shared else 1.0
                rates.update((id(j), each) for j in jobs)
        return rates

    def run(self) -> ServeSimResult:
        k = 0  # next arrival
        eps = 1e-12
        while k < len(self.arrivals) or self.jobs:
            rates = self._rates()
            t_job = min((self.now + j.left / rates[id(j)] for j in self.jobs), default=math.inf)
            t_arr = self.trace[self.arrivals[k]].t if k < len(self.arrivals) else math.inf
            t_next = max(self.now, min(t_job, t_arr))
            dt = t_next - self.now
            for j in self.jobs:
                j.left -= dt * rates[id(j)]
            self.now = t_next
            done = [j for j in self.jobs if j.left <= eps * max(1.0, j.work)]
            if done:
                self.jobs = [j for j in self.jobs if j not in done]
                for j in done:
                    if j.kind == "load":
                        self._loaded(j.replica)
                        j.replica.note_ids(self.now)
                    else:
                        self._stepped(j)
                continue
            if t_arr <= t_next:
                r = self._arrive(self.arrivals[k])
                r.note_ids(self.now)
                k += 1
        return ServeSimResult(
            self.policy,
            tuple(self.ttft),
            tuple(self.waited),
            tuple(self.where),
            dict(self.loads),
            self.seed,
        )


def trace_from(params: TraceParams, models: Sequence[str]) -> list[ServeRequest]:
    """The cluster simulator's seeded bursty trace (``fastckpt.sched.sim.make_trace``: gamma
    inter-arrival times, Zipf popularity, ``tokens_min..tokens_max`` output tokens) over
    ``models``, ``models[k]`` being the k-th most popular. The trace's own model sizes are not
    used (they are the cluster simulator's 7B-70B models)."""
    if len(models) < 2 or len(set(models)) != len(models):
        raise SchedError("a trace needs at least 2 distinct models")
    p = replace(params, models_per_server=len(models) / params.servers)
    specs, reqs = make_trace(p)
    if len(specs) != len(models):  # rounding of models_per_server x servers
        raise SchedError(f"the trace has {len(specs)} models, expected {len(models)}")
    return [ServeRequest(r.t, models[r.model], r.tokens) for r in reqs]


def simulate_serving(
    replicas: Sequence[ReplicaSpec],
    models: Mapping[str, int],
    trace: Sequence[ServeRequest],
    policy: str,
    compute: ComputeCost | Mapping[str, ComputeCost],
    **options: Any,
) -> ServeSimResult:
    """One run; ``options`` are ``ServeSimulation``'s keyword arguments (``max_ongoing``,
    ``overhead_s``, ``machine``, ``step_workers``, ``corun``, ``ids_lag_s``, ``seed``)."""
    return ServeSimulation(replicas, models, trace, policy, compute, **options).run()


def predict(
    replicas: Sequence[ReplicaSpec],
    models: Mapping[str, int],
    trace: Sequence[ServeRequest],
    policy: str,
    compute: ComputeCost | Mapping[str, ComputeCost],
    *,
    seeds: int = 20,
    **options: Any,
) -> dict[str, Any]:
    """The summary averaged over ``seeds`` runs (the default router picks at random; the
    start-time policy is deterministic, so one run is all of it), with each run's summary;
    ``options`` as for ``simulate_serving`` (but ``seed``)."""
    n = seeds if policy == "default" else 1
    runs = [
        simulate_serving(replicas, models, trace, policy, compute, **options, seed=s).summary()
        for s in range(n)
    ]
    out: dict[str, Any] = {
        key: statistics.fmean(r[key] for r in runs)
        for key in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "waited")
    }
    out["requests"] = len(trace)
    out["loads"] = {t: statistics.fmean(r["loads"][t] for r in runs) for t in TIERS}
    out["runs"] = n
    out["spread"] = {
        key: (min(r[key] for r in runs), max(r[key] for r in runs))
        for key in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s")
    }
    return out
