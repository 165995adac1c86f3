"""A seeded, trace-driven cluster simulator comparing placement policies (pure Python).

What is simulated (see docs/sched.md for the reasoning):

- Servers with GPUs and three tiers: a DRAM cache and an SSD cache (LRU, bounded bytes) and remote
  storage that holds every model. True tier speeds differ per server (hardware generations, a
  fraction of degraded SSDs); loads on one tier of one server run one at a time (a queue).
- A trace of requests: bursty arrivals (gamma inter-arrival times with a coefficient of variation
  ``burst_cv``), models drawn by Zipf popularity, output lengths uniform. A request is served at
  once by an idle instance of its model (a warm start, latency 0); otherwise a policy places a new
  instance (a cold start): the load goes to the fastest tier's queue, then the instance serves.
  Finished instances stay idle for ``keep_alive_s``, and idle instances give up their GPUs to new
  starts on demand (least recently used first). Loaded models enter the DRAM and SSD caches.
- Migration: a policy may free GPUs by migrating busy instances to servers with free GPUs; a
  migration takes the recompute time ``a + b*tokens + c*tokens^2`` of the instance (the
  destination is assumed to preload the model while the source still serves, as in live
  migration, so that load is not on the critical path), then the freed GPUs take the new load.
- Requests that no server can take wait in a FIFO queue, retried whenever GPUs free up.

Policies: ``random`` and ``round-robin`` (among servers with enough free GPUs), ``locality``
(least estimated load time from nominal, uncalibrated tier speeds, no migration: ServerlessLLM's
scheduler without migration), ``sllm`` (the same with migration: ServerlessLLM-style), and
``estimator`` (fastckpt.sched.Estimator with each server's calibrated speeds and migration).
Estimate-based policies consider up to ``fanout`` servers caching the model and the ``fanout``
servers with the most available GPUs (ties: lower index), as a real scheduler prunes;
``fanout=0`` considers every server.

Why one module of this size: the trace, the cluster state and the five policies are one
event loop whose parts only make sense together; the estimator it calls lives in ``estimate``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastckpt.sched.estimate import Estimator
from fastckpt.sched.model import (
    Instance,
    ModelSpec,
    RecomputeModel,
    SchedError,
    Server,
    TierQueue,
    TierSpeed,
)

GB = 10**9
POLICIES = ("random", "round-robin", "locality", "sllm", "estimator")
TIERS = ("dram", "ssd", "remote")


@dataclass(frozen=True)
class TraceParams:
    """Everything that defines a simulated cluster and its trace (one seed, one result)."""

    servers: int = 8
    gpus_per_server: int = 8
    models_per_server: float = 4.0
    rate_per_server: float = 0.05  # requests per second
    duration_s: float = 1200.0
    burst_cv: float = 4.0
    zipf: float = 1.0
    tokens_min: int = 64
    tokens_max: int = 1024
    time_per_token_s: float = 0.02
    keep_alive_s: float = 30.0
    dram_cache_bytes: int = 256 * GB
    ssd_cache_bytes: int = 2000 * GB
    degraded_ssd_fraction: float = 0.2
    recompute: tuple[float, float, float] = (0.3, 2e-4, 5e-8)
    calibration_error: float = 0.05
    fanout: int = 8
    seed: int = 0

    def model_sizes(self) -> list[tuple[int, int]]:
        """(bytes, GPUs) choices: 7B, 13B, 34B, 70B at 16 bits, weighted towards small models."""
        return [(14 * GB, 1), (26 * GB, 1), (68 * GB, 2), (140 * GB, 4)]


#: Nominal speeds a scheduler without calibration assumes for every server (bytes/s, seconds).
NOMINAL = {"dram": (24 * GB, 0.0), "ssd": (4 * GB, 0.0), "remote": (1.25 * GB, 0.0)}


@dataclass(frozen=True)
class Request:
    t: float
    model: int
    tokens: int


@dataclass
class _Inst:
    id: str
    model: int
    server: int
    gpus: int
    state: str  # loading | busy | idle
    since: float = 0.0  # busy: request start; idle: idle since
    req_end: float = 0.0
    epoch: int = 0  # bumped on every state change, to invalidate stale events


@dataclass
class _Srv:
    idx: int
    name: str
    gpus: int
    free: int
    speeds: dict[str, tuple[float, float]]  # true (bandwidth, overhead) per tier
    calibrated: tuple[TierSpeed, ...]
    dram: OrderedDict[int, int] = field(default_factory=OrderedDict)
    ssd: OrderedDict[int, int] = field(default_factory=OrderedDict)
    busy_until: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))
    pending: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: {t: [] for t in TIERS}
    )
    insts: dict[str, _Inst] = field(default_factory=dict)
    avail: int = 0  # free GPUs + GPUs of idle instances (kept current by Simulation._touch)


@dataclass(frozen=True)
class SimResult:
    policy: str
    servers: int
    requests: int
    cold_starts: int
    mean_startup_s: float
    p99_startup_s: float
    mean_cold_startup_s: float
    gpu_utilisation: float
    migrations: int
    unplaced: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_trace(p: TraceParams) -> tuple[list[ModelSpec], list[Request]]:
    """Models and a bursty request trace, a pure function of ``p``."""
    rng = random.Random(f"trace-{p.seed}-{p.servers}")
    n_models = max(2, round(p.models_per_server * p.servers))
    sizes = p.model_sizes()
    weights = [0.4, 0.3, 0.2, 0.1]
    models = []
    for k in range(n_models):
        nbytes, gpus = rng.choices(sizes, weights)[0]
        gpus = min(gpus, p.gpus_per_server)
        models.append(ModelSpec(f"m{k}", nbytes, gpus))
    pop = [1.0 / (k + 1) ** p.zipf for k in range(n_models)]
    cum = list(itertools.accumulate(pop))
    rate = p.rate_per_server * p.servers
    shape = 1.0 / (p.burst_cv**2)
    scale = 1.0 / (rate * shape)
    reqs = []
    t = 0.0
    while True:
        t += rng.gammavariate(shape, scale)
        if t >= p.duration_s:
            break
        m = bisect.bisect_left(cum, rng.random() * cum[-1])
        reqs.append(Request(t, min(m, n_models - 1), rng.randint(p.tokens_min, p.tokens_max)))
    return models, reqs


def _make_servers(p: TraceParams) -> list[_Srv]:
    rng = random.Random(f"servers-{p.seed}-{p.servers}")
    out = []
    for i in range(p.servers):
        gen = rng.choice([0.75, 1.0, 1.5])  # hardware generation
        dram = (24 * GB * gen * rng.uniform(0.9, 1.1), 0.05)
        ssd_bw = 4 * GB * gen * rng.uniform(0.8, 1.2)
        if rng.random() < p.degraded_ssd_fraction:
            ssd_bw /= 3
        ssd = (ssd_bw, 0.1)
        remote = (1.25 * GB * rng.uniform(0.6, 1.2), 0.5)
        speeds = {"dram": dram, "ssd": ssd, "remote": remote}
        err = p.calibration_error
        calibrated = tuple(
            TierSpeed(t, bw * rng.uniform(1 - err, 1 + err), ovh) for t, (bw, ovh) in speeds.items()
        )
        out.append(_Srv(i, f"s{i:05d}", p.gpus_per_server, p.gpus_per_server, speeds, calibrated))
    return out


_NOMINAL_TIERS = tuple(TierSpeed(t, bw, ovh) for t, (bw, ovh) in NOMINAL.items())


class Simulation:
    """One run of one policy over one trace."""

    def __init__(self, p: TraceParams, policy: str) -> None:
        if policy not in POLICIES:
            raise SchedError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        self.p = p
        self.policy = policy
        self.models, self.trace = make_trace(p)
        self.servers = _make_servers(p)
        self.rng = random.Random(f"policy-{p.seed}-{policy}")
        self.recompute = RecomputeModel(*p.recompute)
        self.estimator = Estimator(self.recompute, migrate=policy in ("sllm", "estimator"))
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.idle: dict[int, OrderedDict[str, _Inst]] = {}
        self.waiting: list[tuple[float, Request]] = []
        self.latencies: list[float] = []
        self.cold = 0
        self.migrations = 0
        self.busy_gpu_s = 0.0
        self.rr = 0
        self.ids = itertools.count()
        self.where: dict[int, set[int]] = {}  # model -> servers caching it (DRAM or SSD)
        # available GPUs -> servers: "most available" and "fits" cost O(GPUs), not O(servers)
        self.by_avail: list[set[int]] = [set() for _ in range(p.gpus_per_server + 1)]
        for srv in self.servers:
            srv.avail = srv.gpus
            self.by_avail[srv.avail].add(srv.idx)

    # --- bookkeeping -----------------------------------------------------------------------

    def _push(self, t: float, kind: str, data: Any) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def _avail(self, s: _Srv) -> int:
        return s.avail

    def _touch(self, s: _Srv) -> None:
        new = s.free + sum(i.gpus for i in s.insts.values() if i.state == "idle")
        if new != s.avail:
            self.by_avail[s.avail].discard(s.idx)
            self.by_avail[new].add(s.idx)
            s.avail = new

    def _fitting(self, gpus: int) -> list[int]:
        out: list[int] = []
        for a in range(gpus, len(self.by_avail)):
            out.extend(self.by_avail[a])
        out.sort()
        return out

    def _most_available(self, k: int, exclude: int = -1) -> list[int]:
        out: list[int] = []
        for a in range(len(self.by_avail) - 1, -1, -1):
            bucket = self.by_avail[a]
            if bucket:
                out.extend(heapq.nsmallest(k - len(out) + 1, bucket))
                out = [i for i in out if i != exclude][:k]
                if len(out) >= k:
                    break
        return out

    def _cache(self, s: _Srv, tier: str, model: int) -> None:
        cache = s.dram if tier == "dram" else s.ssd
        cap = self.p.dram_cache_bytes if tier == "dram" else self.p.ssd_cache_bytes
        nbytes = self.models[model].nbytes
        if nbytes > cap:
            return
        cache[model] = nbytes
        cache.move_to_end(model)
        while sum(cache.values()) > cap:
            old, _ = cache.popitem(last=False)
            if old not in s.dram and old not in s.ssd:
                self.where.get(old, set()).discard(s.idx)
        self.where.setdefault(model, set()).add(s.idx)

    def _holds(self, s: _Srv, model: int) -> list[str]:
        out = [t for t, c in (("dram", s.dram), ("ssd", s.ssd)) if model in c]
        return [*out, "remote"]

    def _queue(self, s: _Srv, tier: str) -> TierQueue:
        pend = [(end, b) for end, b in s.pending[tier] if end > self.now]
        s.pending[tier] = pend
        return TierQueue(len(pend), sum(b for _, b in pend))

    def _view(self, s: _Srv, tiers: Sequence[TierSpeed]) -> Server:
        running = tuple(
            Instance(i.id, self.models[i.model].name, i.gpus, self._tokens(i))
            for i in s.insts.values()
            if i.state == "busy"
        )
        return Server(
            name=s.name,
            tiers=tuple(tiers),
            gpus=s.gpus,
            free_gpus=self._avail(s),
            holds={
                "dram": frozenset(self.models[m].name for m in s.dram),
                "ssd": frozenset(self.models[m].name for m in s.ssd),
            },
            queues={t: self._queue(s, t) for t in TIERS},
            running=running,
            everywhere=frozenset({"remote"}),
        )

    def _tokens(self, i: _Inst) -> int:
        return max(0, int((self.now - i.since) / self.p.time_per_token_s))

    # --- policies ----------------------------------------------------------------------------

    def _candidates(self, model: int) -> list[_Srv]:
        if self.p.fanout <= 0:
            return self.servers
        chosen = {i for i in self.where.get(model, ())}
        top = heapq.nlargest(self.p.fanout, self.servers, key=lambda s: (self._avail(s), -s.idx))
        chosen.update(s.idx for s in top)
        return [self.servers[i] for i in sorted(chosen)]

    def _place(self, model: int) -> tuple[_Srv, tuple[str, ...]] | None:
        spec = self.models[model]
        if self.policy in ("random", "round-robin"):
            fits = self._fitting(spec.gpus)
            if not fits:
                return None
            if self.policy == "random":
                return self.servers[self.rng.choice(fits)], ()
            n = len(self.servers)
            for k in range(n):
                s = self.servers[(self.rr + k) % n]
                if self._avail(s) >= spec.gpus:
                    self.rr = (s.idx + 1) % n
                    return s, ()
            return None
        cands = self._candidates(model)
        calibrated = self.policy == "estimator"
        views = [self._view(s, s.calibrated if calibrated else _NOMINAL_TIERS) for s in cands]
        ranked = self.estimator.rank(views, spec)
        for est in ranked:
            if not est.feasible:
                break
            s = self.servers[int(est.server[1:])]
            moves = tuple(i.id for i in est.migration.instances) if est.migration else ()
            if self._destinations(s, moves) is not None:
                return s, moves
        return None

    def _destinations(self, src: _Srv, moves: Sequence[str]) -> list[_Srv] | None:
        if not moves:
            return []
        # the servers with the most available GPUs take the migrated instances (first fit)
        top = self._most_available(len(moves) + 1, exclude=src.idx)
        avail = {i: self.servers[i].avail for i in top}
        out = []
        for iid in moves:
            g = src.insts[iid].gpus
            best = max(avail, key=lambda i: (avail[i], -i), default=None)
            if best is None or avail[best] < g:
                return None
            avail[best] -= g
            out.append(self.servers[best])
        return out

    # --- actions -----------------------------------------------------------------------------

    def _take_gpus(self, s: _Srv, gpus: int) -> None:
        while s.free < gpus:
            idle = [i for i in s.insts.values() if i.state == "idle"]
            if not idle:
                raise AssertionError("placed without enough GPUs")
            victim = min(idle, key=lambda i: (i.since, i.id))
            self._unload(victim)
        s.free -= gpus
        self._touch(s)

    def _unload(self, i: _Inst) -> None:
        s = self.servers[i.server]
        del s.insts[i.id]
        self.idle.get(i.model, OrderedDict()).pop(i.id, None)
        s.free += i.gpus
        i.epoch += 1
        self._touch(s)

    def _start(self, req: Request, arrived: float) -> bool:
        spec = self.models[req.model]
        placed = self._place(req.model)
        if placed is None:
            return False
        s, moves = placed
        ready = self.now
        if moves:
            dests = self._destinations(s, moves)
            assert dests is not None
            for iid, dst in zip(moves, dests, strict=True):
                inst = s.insts[iid]
                cost = self.recompute.cost_s(self._tokens(inst))
                ready = ready + cost  # migrations one after another (as the estimate assumes)
                self._take_gpus(dst, inst.gpus)
                del s.insts[iid]
                s.free += inst.gpus
                self._touch(s)
                inst.server = dst.idx
                inst.req_end += cost  # the migrated request pauses for the recompute
                inst.epoch += 1
                dst.insts[iid] = inst
                self._push(inst.req_end, "done", (inst, inst.epoch))
                self.migrations += 1
        self._take_gpus(s, spec.gpus)
        tier = min(
            self._holds(s, req.model),
            key=lambda t: (self._true_load_end(s, t, spec.nbytes, ready), t),
        )
        end = self._true_load_end(s, tier, spec.nbytes, ready)
        s.busy_until[tier] = end
        s.pending[tier].append((end, spec.nbytes))
        inst = _Inst(f"i{next(self.ids)}", req.model, s.idx, spec.gpus, "loading")
        s.insts[inst.id] = inst
        for t in ("dram", "ssd"):
            self._cache(s, t, req.model)
        self.cold += 1
        self._push(end, "loaded", (inst, inst.epoch, req, arrived))
        return True

    def _true_load_end(self, s: _Srv, tier: str, nbytes: int, ready: float) -> float:
        bw, ovh = s.speeds[tier]
        return max(ready, s.busy_until[tier]) + ovh + nbytes / bw

    def _serve(self, inst: _Inst, req: Request, arrived: float) -> None:
        inst.state = "busy"
        inst.since = self.now
        inst.req_end = self.now + req.tokens * self.p.time_per_token_s
        inst.epoch += 1
        self._touch(self.servers[inst.server])
        self.latencies.append(self.now - arrived)
        self.busy_gpu_s += inst.gpus * (inst.req_end - self.now)
        self._push(inst.req_end, "done", (inst, inst.epoch))

    def _arrive(self, req: Request, arrived: float) -> bool:
        idle = self.idle.get(req.model)
        if idle:
            _, inst = idle.popitem(last=True)  # most recently idle: its caches are warmest
            self._serve(inst, req, arrived)
            return True
        return self._start(req, arrived)

    def _retry_waiting(self) -> None:
        while self.waiting:
            arrived, req = self.waiting[0]
            if not self._arrive(req, arrived):
                return
            self.waiting.pop(0)

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        for req in self.trace:
            self._push(req.t, "arrive", req)
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                if self.idle.get(data.model):
                    self._arrive(data, data.t)
                elif self.waiting or not self._start(data, data.t):
                    self.waiting.append((data.t, data))
            elif kind == "loaded":
                inst, epoch, req, arrived = data
                if epoch == inst.epoch:
                    self._serve(inst, req, arrived)
            elif kind == "done":
                inst, epoch = data
                if epoch != inst.epoch:
                    continue
                inst.state = "idle"
                inst.since = self.now
                inst.epoch += 1
                self.idle.setdefault(inst.model, OrderedDict())[inst.id] = inst
                self._touch(self.servers[inst.server])
                self._push(self.now + self.p.keep_alive_s, "expire", (inst, inst.epoch))
                self._retry_waiting()
            elif kind == "expire":
                inst, epoch = data
                if epoch == inst.epoch and inst.state == "idle":
                    self._unload(inst)
                    self._retry_waiting()
        wall = time.perf_counter() - t0
        lat = sorted(self.latencies)
        end = max(self.p.duration_s, self.now)
        total_gpus = self.p.servers * self.p.gpus_per_server
        cold_lat = [x for x in lat if x > 0]
        return SimResult(
            policy=self.policy,
            servers=self.p.servers,
            requests=len(self.trace),
            cold_starts=self.cold,
            mean_startup_s=statistics.fmean(lat) if lat else 0.0,
            p99_startup_s=lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else 0.0,
            mean_cold_startup_s=statistics.fmean(cold_lat) if cold_lat else 0.0,
            gpu_utilisation=self.busy_gpu_s / (total_gpus * end),
            migrations=self.migrations,
            unplaced=len(self.waiting),
            wall_s=wall,
        )


def simulate(p: TraceParams, policy: str) -> SimResult:
    return Simulation(p, policy).run()


def compare(
    sizes: Sequence[int],
    policies: Sequence[str] = POLICIES,
    base: TraceParams | None = None,
    progress: Callable[[SimResult], None] | None = None,
) -> list[SimResult]:
    """Every policy at every cluster size on the same traces."""
    base = base or TraceParams()
    out = []
    for n in sizes:
        params = TraceParams(**{**asdict(base), "servers": n})
        for policy in policies:
            r = simulate(params, policy)
            out.append(r)
            if progress is not None:
                progress(r)
    return out


def table(results: Sequence[SimResult]) -> str:
    """Markdown: one row per (size, policy)."""
    lines = [
        "| servers | policy | requests | cold starts | mean startup s | p99 startup s | "
        "GPU util | migrations | sim wall s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.servers} | {r.policy} | {r.requests} | {r.cold_starts} | "
            f"{r.mean_startup_s:.2f} | {r.p99_startup_s:.2f} | {r.gpu_utilisation:.1%} | "
            f"{r.migrations} | {r.wall_s:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m fastckpt.sched.sim", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--sizes", default="1,8,64,512", help="cluster sizes (servers)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=TraceParams.duration_s)
    ap.add_argument("--rate", type=float, default=TraceParams.rate_per_server)
    ap.add_argument("--json", default=None, help="also write results as JSON here")
    a = ap.parse_args(argv)
    base = TraceParams(seed=a.seed, duration_s=a.duration, rate_per_server=a.rate)
    sizes = [int(x) for x in a.sizes.split(",")]
    res = compare(
        sizes,
        [x for x in a.policies.split(",") if x],
        base,
        progress=lambda r: print(
            f"# {r.servers} servers, {r.policy}: {r.wall_s:.2f} s", flush=True
        ),
    )
    print(f"trace: {json.dumps({k: v for k, v in asdict(base).items() if k != 'servers'})}")
    print(table(res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"params": asdict(base), "results": [r.as_dict() for r in res]}, fh, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
