"""Serverless serving end to end: plain Ray Serve against fastckpt on a local multi-node Ray
cluster, one seeded bursty trace, and the simulator's prediction beside each measurement.

``python -m fastckpt.bench.serverless --workdir W --out O`` (``--quick`` for a small version;
``fastckpt bench --scenario serverless`` runs that through the harness):

1. Models: several real architectures (Llama, Qwen2, Mistral, GPT-2) with random weights, saved
   as stock safetensors model folders in a "store" that stands for remote storage. Sizes are
   chosen so that a node's DRAM budget holds only some of them.
2. Calibration, in this process and through the deployment's own load function: each tier's
   fitted ``overhead + bytes / bandwidth`` (``dram``: the Loader's DRAM tier; ``ssd``: the SSD
   tier's converted copy, out of the page cache; ``remote``: the store, out of the page cache,
   converted on the way; ``plain``: ``from_pretrained`` from the store, out of the page cache),
   and each model's time to the first token once resident. The tier speeds become the machine
   profile (``fastckpt.sched.MachineProfile``) that the replicas report.
3. The trace: ``fastckpt.sched.sim.make_trace`` (gamma inter-arrival times, Zipf popularity)
   over the models, through ``fastckpt.sched.sim_serve.trace_from``.
4. Two runs on a fresh local cluster each (``ray start --head`` and worker nodes, one replica
   per node, each node with its own SSD directory, budgets and page-cache isolation): ``plain``
   (Ray Serve's default router, ``from_pretrained`` on each load, no tiers) and ``fastckpt``
   (its Loader, DRAM and SSD tiers, ``StartTimeRouter`` with reservations). Every request
   streams greedy tokens that must equal a reference computed here with ``from_pretrained``;
   time to first token is measured by the client.
5. The simulator (``fastckpt.sched.sim_serve``) replays the same trace on the calibrated tiers
   and compute times: ``default`` policy for the plain run, ``start-time`` for fastckpt.

Writes ``serverless.json`` (everything), ``serverless.md`` (the table and the machine) and
``serverless.png`` (time-to-first-token CDFs: both runs measured and predicted). Models,
references and calibration are in ``serverless_prep``, the prediction and the report in
``serverless_report`` (``--repredict`` runs it again on a finished run's JSON).

One machine stands for several nodes: a node's page cache is emulated by evicting from the
machine's page cache what the node's tiers do not hold (``ModelHost(isolate_page_cache=True)``),
and the store is read cold every time, as remote storage would be. All nodes share the
machine's CPUs and disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastckpt.bench import serverless_report as report
from fastckpt.bench.common import log
from fastckpt.bench.ray_cluster import LocalCluster, NodeSpec
from fastckpt.bench.serverless_prep import (
    FULL_MODELS,
    PROMPTS,
    QUICK_MODELS,
    ModelShape,
    calibrate,
    make_models,
    prompt_of,
    references,
)
from fastckpt.bench.tenants import BackgroundSampler
from fastckpt.rules.units import parse_size
from fastckpt.sched.sim import TraceParams
from fastckpt.sched.sim_serve import ServeRequest, summarise, trace_from

RUNS = report.RUNS


@dataclass(frozen=True)
class Setup:
    models: tuple[ModelShape, ...] = FULL_MODELS
    nodes: int = 3
    # models resident per replica (Ray Serve's max_num_models_per_replica): one, so that six
    # models on three replicas restart often and a restart's tier matters
    slots: int = 1
    dram_bytes: int = 600 * 10**6
    ssd_bytes: int = 4 * 10**9
    duration_s: float = 150.0  # the whole run then takes about 11 minutes on 2 cores
    rate_per_node: float = 0.25
    burst_cv: float = 4.0
    zipf: float = 1.0
    tokens_min: int = 4
    tokens_max: int = 16
    seed: int = 0
    stats_period_s: float = 1.0
    calib_repeats: int = 2
    node_cpus: float = 1.0
    request_timeout_s: float = 600.0

    def trace_params(self) -> TraceParams:
        return TraceParams(
            servers=self.nodes,
            models_per_server=len(self.models) / self.nodes,
            rate_per_server=self.rate_per_node,
            duration_s=self.duration_s,
            burst_cv=self.burst_cv,
            zipf=self.zipf,
            tokens_min=self.tokens_min,
            tokens_max=self.tokens_max,
            seed=self.seed,
        )


QUICK = Setup(
    models=QUICK_MODELS,
    nodes=2,
    dram_bytes=8 * 10**6,
    ssd_bytes=10**9,
    duration_s=30.0,
    rate_per_node=0.3,
    tokens_max=6,
    calib_repeats=1,
    stats_period_s=0.5,
)


# --------------------------------------------------------------------------------------------
# one run on a local cluster
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    overhead_s: float = 0.0  # median time to the first item of a request without a model
    background: float = 0.0  # other scheduling groups with runnable threads during the replay
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r["ok"]]
        loads: dict[str, int] = {}
        seen = set()
        for r in ok:
            if r["waited"] and r["load"] and r["load"] not in seen:
                seen.add(r["load"])
                loads[r["tier"]] = loads.get(r["tier"], 0) + 1
        out = summarise([r["ttft_s"] for r in ok], [r["waited"] for r in ok], loads)
        out["failed"] = len(self.requests) - len(ok)
        return out


def node_specs(setup: Setup, run: str, workdir: str, profile_path: str) -> list[NodeSpec]:
    specs = []
    for k in range(setup.nodes):
        env = {"FASTCKPT_SCHED_PROFILE": profile_path}
        if run == "fastckpt":
            env.update(
                FASTCKPT_DRAM_TIER_BYTES=str(setup.dram_bytes),
                FASTCKPT_SSD_TIER_BYTES=str(setup.ssd_bytes),
                FASTCKPT_SSD_TIER_DIR=os.path.join(workdir, f"node{k}", "ssd"),
            )
        specs.append(
            NodeSpec(f"node{k}", setup.node_cpus, {"fastckpt_replica": 1, f"node{k}": 1}, env)
        )
    return specs


def run_once(
    setup: Setup,
    run: str,
    catalog: Mapping[str, Any],
    trace: Sequence[ServeRequest],
    refs: Mapping[str, list[list[int]]],
    workdir: str,
    profile_path: str,
) -> RunResult:
    """Start a cluster, deploy, replay the trace, check every response, stop the cluster."""
    from ray import serve

    from fastckpt.integrations.ray_serve.host import build_app

    shapes = {s.name: s for s in setup.models}
    result = RunResult(run)
    shutil.rmtree(os.path.join(workdir, run), ignore_errors=True)
    with LocalCluster(node_specs(setup, run, os.path.join(workdir, run), profile_path)) as cluster:
        cluster.connect(log_to_driver=False)
        serve.start(proxy_location="Disabled")
        app = build_app(
            catalog,
            num_replicas=setup.nodes,
            router="start-time" if run == "fastckpt" else "default",
            max_models_per_replica=setup.slots,
            stats_period_s=setup.stats_period_s,
            ray_actor_options={"num_cpus": 0, "resources": {"fastckpt_replica": 1}},
            max_replicas_per_node=1,
            mode=run,
            profile=profile_path,
            isolate_page_cache=True,
        )
        handle = serve.run(app, name=f"serverless-{run}")
        time.sleep(3 * setup.stats_period_s)  # every replica's first routing stats are out
        result.overhead_s = asyncio.run(_overhead(handle))
        log(f"{run}: a request's way through Ray Serve takes {result.overhead_s * 1e3:.1f} ms")
        log(f"{run}: replaying {len(trace)} requests over {setup.duration_s:.0f} s")
        t0 = time.monotonic()
        # the nodes run in sessions of their own (their pid): leave out what the simulator models
        with BackgroundSampler(lambda: [n.proc.pid for n in cluster.nodes]) as sampler:
            result.requests = asyncio.run(_replay(handle, trace, shapes, refs, setup))
        result.background = sampler.mean()
        result.wall_s = time.monotonic() - t0
        log(f"{run}: other tenants: {result.background:.1f} runnable scheduling groups on average")
    return result


async def _overhead(handle: Any, n: int = 15) -> float:
    """Median seconds to the first streamed item of a request without a model (``ping``)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        async for _item in handle.options(stream=True).ping.remote():
            times.append(time.perf_counter() - t0)
            break
    return statistics.median(times)


async def _replay(
    handle: Any,
    trace: Sequence[ServeRequest],
    shapes: Mapping[str, ModelShape],
    refs: Mapping[str, list[list[int]]],
    setup: Setup,
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5

    async def one(i: int, req: ServeRequest) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + req.t - loop.time()))
        k = i % PROMPTS
        prompt = prompt_of(shapes[req.model], k)
        rec: dict[str, Any] = {"i": i, "t": req.t, "model": req.model, "tokens": req.tokens}
        t_send = time.perf_counter()
        header: dict[str, Any] = {}
        got: list[int] = []
        try:

            async def consume() -> None:
                gen = handle.options(multiplexed_model_id=req.model, stream=True).generate.remote(
                    prompt, req.tokens
                )
                async for item in gen:
                    if isinstance(item, dict):
                        header.update(item)
                        rec["header_s"] = time.perf_counter() - t_send
                    else:
                        if not got:
                            rec["ttft_s"] = time.perf_counter() - t_send
                        got.append(item)

            await asyncio.wait_for(consume(), setup.request_timeout_s)
            expected = refs[req.model][k][: req.tokens]
            rec["ok"] = got == expected
            if not rec["ok"]:
                rec["error"] = f"tokens {got} != reference {expected}"
        except Exception as exc:
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rec["total_s"] = time.perf_counter() - t_send
        for key in ("replica", "node", "waited", "tier", "load_s", "load", "wait_s"):
            rec[key] = header.get(key)
        return rec

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(trace))))


def run(setup: Setup, workdir: str, out: str, runs: Sequence[str] = RUNS) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the data written to ``out``."""
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    t_all = time.monotonic()
    log(f"models: {', '.join(s.name for s in setup.models)}")
    paths = make_models(os.path.join(workdir, "store"), setup.models)
    from fastckpt.integrations.ray_serve.catalog import Catalog

    catalog = Catalog.from_dict({"models": {n: {"path": p} for n, p in paths.items()}})
    sizes = {n: e.nbytes for n, e in catalog.items()}
    log("references (from_pretrained, greedy)")
    refs = references(paths, setup.models, setup.tokens_max)
    log("calibration")
    cal = calibrate(paths, setup.models, workdir, repeats=setup.calib_repeats)
    for t, f in cal.tiers.items():
        log(f"  {t}: {f['bandwidth_bps'] / 1e6:.0f} MB/s + {f['overhead_s'] * 1e3:.0f} ms")
    log(f"  other tenants: {cal.background:.1f} runnable scheduling groups on average")
    trace = trace_from(setup.trace_params(), [s.name for s in setup.models])
    data: dict[str, Any] = {
        "setup": {
            **asdict(setup),
            "models": [asdict(m) for m in setup.models],
            "ids_lag_s": report.ids_lag_s(),
        },
        "model_bytes": sizes,
        "machine": report.machine(),
        "calibration": {
            "tiers": cal.tiers,
            "compute": {k: asdict(v) for k, v in cal.compute.items()},
            "background": cal.background,
            "corun": cal.corun,
        },
        "trace": [asdict(r) for r in trace],
        "runs": {},
        "predicted": {},
        "difference": {},
        "ttft": {},
        "requests": {},
        "notes": [],
    }
    for name in runs:
        log(f"run {name}")
        res = run_once(setup, name, catalog.as_dict(), trace, refs, workdir, cal.profile_path)
        data["runs"][name] = res.summary()
        data["runs"][name]["wall_s"] = res.wall_s
        data["runs"][name]["overhead_s"] = res.overhead_s
        data["runs"][name]["background"] = res.background
        data["requests"][name] = res.requests
        data["ttft"][name] = {"measured": [r["ttft_s"] for r in res.requests if r["ok"]]}
        log(f"{name}: {json.dumps(data['runs'][name])}")
        errors = [r for r in res.requests if not r["ok"]]
        if errors:
            data["notes"].append(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
    report.predict_all(data)
    for name, pred in data["predicted"].items():
        log(f"{name} predicted: mean {pred['mean_ttft_s']:.3f} p50 {pred['p50_ttft_s']:.3f}")
    data["wall_s"] = time.monotonic() - t_all
    report.write(data, out)
    return data


def repredict(path: str, out: str) -> dict[str, Any]:
    """The prediction and report of a finished run (its ``serverless.json``) made again."""
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    report.predict_all(data)
    report.write(data, out)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastckpt.bench.serverless", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--workdir", help="models, caches and cluster files")
    ap.add_argument("--out", required=True, help="where serverless.{json,md,png} go")
    ap.add_argument(
        "--repredict",
        metavar="JSON",
        help="no cluster: the simulator's prediction and the report of a finished run again",
    )
    ap.add_argument("--quick", action="store_true", help="the small version (2 nodes, 3 models)")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--duration", type=float, help="seconds of trace")
    ap.add_argument("--rate", type=float, help="requests per second per node (mean)")
    ap.add_argument("--dram-budget", help="DRAM tier per node (e.g. 320MB)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--calib-repeats", type=int, help="measured rounds per tier (default 2)")
    ap.add_argument("--slots", type=int, help="models resident per replica (default 1)")
    ap.add_argument("--runs", default=",".join(RUNS), help="plain,fastckpt")
    a = ap.parse_args(argv)
    if a.repredict:
        data = repredict(a.repredict, a.out)
        print(report.table(data))
        return 0
    if not a.workdir:
        ap.error("--workdir is required (except with --repredict)")
    setup = QUICK if a.quick else Setup()
    overrides: dict[str, Any] = {}
    for key, value in (
        ("nodes", a.nodes),
        ("duration_s", a.duration),
        ("rate_per_node", a.rate),
        ("seed", a.seed),
        ("dram_bytes", parse_size(a.dram_budget) if a.dram_budget else None),
        ("calib_repeats", a.calib_repeats),
        ("slots", a.slots),
    ):
        if value is not None:
            overrides[key] = value
    setup = replace(setup, **overrides)
    runs = [r for r in a.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}")
    data = run(setup, a.workdir, a.out, runs)
    print(report.table(data))
    return 0 if not data["notes"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
