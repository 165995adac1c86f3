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
``serverless.png`` (time-to-first-token CDFs: both runs measured and predicted).

One machine stands for several nodes: a node's page cache is emulated by evicting from the
machine's page cache what the node's tiers do not hold (``ModelHost(isolate_page_cache=True)``),
and the store is read cold every time, as remote storage would be. All nodes share the
machine's CPUs and disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastckpt.bench.common import cpu_model, log, meminfo
from fastckpt.bench.ray_cluster import LocalCluster, NodeSpec
from fastckpt.rules.units import format_bytes, parse_size
from fastckpt.sched.sim import TraceParams
from fastckpt.sched.sim_serve import (
    ComputeCost,
    Machine,
    ReplicaSpec,
    ServeRequest,
    predict,
    summarise,
    trace_from,
)

PROMPTS = 4  # distinct prompts per model (references are computed once per prompt)
PROMPT_LEN = 8
RUNS = ("plain", "fastckpt")
POLICY = {"plain": "default", "fastckpt": "start-time"}
AGREEMENT = 0.25  # the simulator must predict the measured mean and p50 within 25%


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model: architecture, width, depth, vocabulary (fp32 weights)."""

    name: str
    arch: str  # llama | qwen2 | mistral | gpt2
    hidden: int
    layers: int
    vocab: int
    seed: int

    def config(self) -> Any:
        import transformers

        heads = max(1, self.hidden // 64)
        if self.arch == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.vocab,
                n_embd=self.hidden,
                n_layer=self.layers,
                n_head=heads,
                n_positions=256,
                bos_token_id=self.vocab - 1,
                eos_token_id=self.vocab - 1,
            )
        cls = {
            "llama": transformers.LlamaConfig,
            "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig,
        }[self.arch]
        return cls(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 8 // 3 // 32 * 32,
            num_hidden_layers=self.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )


#: The full run: six models of 28-254 MB (705 MB), 3 nodes whose 600 MB DRAM tiers hold most.
FULL_MODELS = (
    ModelShape("llama-a", "llama", 768, 6, 16000, 1),
    ModelShape("qwen-b", "qwen2", 640, 6, 16000, 2),
    ModelShape("mistral-c", "mistral", 512, 6, 12000, 3),
    ModelShape("gpt2-d", "gpt2", 512, 4, 12000, 4),
    ModelShape("llama-e", "llama", 384, 4, 8000, 5),
    ModelShape("qwen-f", "qwen2", 256, 4, 8000, 6),
)
#: The small version: three models of 2-6 MB on 2 nodes.
QUICK_MODELS = (
    ModelShape("llama-a", "llama", 128, 2, 4000, 1),
    ModelShape("qwen-b", "qwen2", 96, 2, 4000, 2),
    ModelShape("gpt2-c", "gpt2", 64, 2, 4000, 3),
)


@dataclass(frozen=True)
class Setup:
    models: tuple[ModelShape, ...] = FULL_MODELS
    nodes: int = 3
    slots: int = 2  # models resident per replica (Ray Serve's max_num_models_per_replica)
    dram_bytes: int = 600 * 10**6
    ssd_bytes: int = 4 * 10**9
    duration_s: float = 240.0
    rate_per_node: float = 0.25
    burst_cv: float = 4.0
    zipf: float = 1.0
    tokens_min: int = 4
    tokens_max: int = 16
    seed: int = 0
    stats_period_s: float = 1.0
    calib_repeats: int = 3
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
# models and references
# --------------------------------------------------------------------------------------------


def make_models(store: str, shapes: Sequence[ModelShape]) -> dict[str, str]:
    """Save each model (random weights, seeded) as a safetensors model folder under ``store``;
    folders already there are kept."""
    import torch
    import transformers

    os.makedirs(store, exist_ok=True)
    out = {}
    for shape in shapes:
        path = os.path.join(store, shape.name)
        out[shape.name] = path
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        torch.manual_seed(shape.seed)
        cfg = shape.config()
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, path)
    return out


def prompt_of(shape: ModelShape, k: int) -> list[int]:
    """The ``k``-th prompt of a model (token ids inside its vocabulary)."""
    return [(shape.seed * 131 + k * 17 + j * 7) % (shape.vocab - 1) for j in range(PROMPT_LEN)]


def references(paths: Mapping[str, str], shapes: Sequence[ModelShape], tokens: int) -> dict:
    """Greedy tokens of every prompt of every model, from ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from fastckpt.integrations.ray_serve.host import greedy_tokens

    out: dict[str, list[list[int]]] = {}
    for shape in shapes:
        model = AutoModelForCausalLM.from_pretrained(paths[shape.name]).eval()
        out[shape.name] = [
            greedy_tokens(model, prompt_of(shape, k), tokens) for k in range(PROMPTS)
        ]
        del model
    return out


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    tiers: dict[str, dict[str, Any]]  # tier -> fit (bandwidth_bps, overhead_s, ...) and samples
    compute: dict[str, ComputeCost]
    profile_path: str
    background: float = 0.0  # other scheduling groups with runnable threads while calibrating

    def speeds(self) -> dict[str, Any]:
        from fastckpt.sched.model import TierSpeed

        return {t: TierSpeed(t, f["bandwidth_bps"], f["overhead_s"]) for t, f in self.tiers.items()}


def _drop(paths: Sequence[str]) -> None:
    from fastckpt.io_engine import drop_page_cache

    for root in paths:
        for dirpath, _, names in os.walk(root):
            for n in names:
                with contextlib.suppress(OSError):
                    drop_page_cache(os.path.join(dirpath, n))


def calibrate(
    paths: Mapping[str, str],
    shapes: Sequence[ModelShape],
    workdir: str,
    *,
    repeats: int,
    threads: int = 1,
) -> Calibration:
    """Fit each tier of the deployment's load path (module docstring) and time first tokens,
    noting the other tenants' load meanwhile."""
    with BackgroundSampler(lambda: [os.getsid(0)]) as sampler:  # all but this process's group
        cal = _calibrate(paths, shapes, workdir, repeats=repeats, threads=threads)
    cal.background = sampler.mean()
    return cal


def _calibrate(
    paths: Mapping[str, str],
    shapes: Sequence[ModelShape],
    workdir: str,
    *,
    repeats: int,
    threads: int,
) -> Calibration:
    import torch

    import fastckpt
    from fastckpt.integrations.ray_serve.catalog import ModelEntry
    from fastckpt.integrations.ray_serve.host import decode_step, load_transformers
    from fastckpt.sched.calibrate import measure_tier
    from fastckpt.sched.profile import MachineProfile, profile_from_fits

    torch.set_num_threads(threads)
    ssd_dir = os.path.join(workdir, "calib-ssd")
    shutil.rmtree(ssd_dir, ignore_errors=True)
    sizes = {n: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if
                    f.endswith(".safetensors")) for n, p in paths.items()}  # fmt: skip
    entries = {n: ModelEntry(n, p, sizes[n]) for n, p in paths.items()}
    settings: dict[str, Any] = {
        "dram_tier_bytes": 4 << 30,
        "ssd_tier_bytes": 8 << 30,
        "ssd_tier_dir": ssd_dir,
    }

    def timed(load: Callable[[], Any], name: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        model = load()
        seconds = time.perf_counter() - t0
        del model
        return sizes[name], seconds

    def fresh(name: str) -> tuple[int, float]:
        # a Loader of its own: an empty DRAM tier, the SSD tier's copies on disk; closing it
        # unlocks what its DRAM tier held, so the next measurement's page-cache drop works
        with fastckpt.Loader(**settings) as loader:
            return timed(lambda: load_transformers(entries[name], "cpu", loader), name)

    def copies() -> list[str]:
        return [os.path.join(ssd_dir, d) for d in os.listdir(ssd_dir) if not d.startswith(".")]

    def cold_remote(name: str) -> None:
        with fastckpt.Loader(**settings) as loader:
            loader.evict(paths[name])  # the SSD tier's copy
        _drop([paths[name]])

    def cold_ssd(name: str) -> None:
        with fastckpt.Loader(**settings) as loader:
            loader.prefetch(paths[name], tier="ssd").result()
        _drop([paths[name], *copies()])

    order = sorted(paths, key=lambda n: sizes[n])
    runs = {
        "remote": measure_tier("remote", fresh, order, prepare=cold_remote, repeats=repeats),
        "ssd": measure_tier("ssd", fresh, order, prepare=cold_ssd, repeats=repeats),
    }
    with fastckpt.Loader(**settings) as warm:

        def in_dram(name: str) -> None:
            timed(lambda: load_transformers(entries[name], "cpu", warm), name)

        runs["dram"] = measure_tier(
            "dram",
            lambda n: timed(lambda: load_transformers(entries[n], "cpu", warm), n),
            order,
            prepare=in_dram,
            repeats=repeats,
        )
    runs["plain"] = measure_tier(
        "plain",
        lambda n: timed(lambda: load_transformers(entries[n], "cpu", None), n),
        order,
        prepare=lambda n: _drop([paths[n]]),
        repeats=repeats,
    )
    profile = profile_from_fits("cpu", {t: r.fit for t, r in runs.items() if t != "plain"})
    profile_path = os.path.join(workdir, "sched-profile.json")
    MachineProfile.save(profile, profile_path)
    compute = {}
    for shape in shapes:
        model = load_transformers(entries[shape.name], "cpu", None)
        firsts, steps = [], []
        for k in range(PROMPTS + 1):
            t0 = time.perf_counter()
            nxt, past = decode_step(model, prompt_of(shape, k % PROMPTS), None)
            t1 = time.perf_counter()
            decode_step(model, [nxt], past)
            t2 = time.perf_counter()
            if k:  # the first round warms the code paths
                firsts.append(t1 - t0)
                steps.append(t2 - t1)
        compute[shape.name] = ComputeCost(statistics.median(firsts), statistics.median(steps))
        del model
    tiers = {
        t: {
            "bandwidth_bps": r.fit.bandwidth_bps,
            "overhead_s": r.fit.overhead_s,
            "max_rel_residual": r.fit.max_rel_residual,
            "samples": [[s.nbytes, s.seconds] for s in r.samples],
            "warmup": r.warmup,
        }
        for t, r in runs.items()
    }
    shutil.rmtree(ssd_dir, ignore_errors=True)
    return Calibration(tiers, compute, profile_path)


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


class BackgroundSampler:
    """The load of other tenants of this machine while a phase runs, as the scheduler sees it.

    Linux's fair scheduler shares the CPUs between scheduling groups first: with autogroup on
    (``/proc/sys/kernel/sched_autogroup_enabled``, the default of most kernels) every session
    is one group, whatever its number of threads; without it every thread is. Every
    ``interval_s`` this counts the groups with a runnable thread, leaving out the sessions
    ``exclude()`` returns (the local cluster's nodes, whose work the simulator models) and this
    sampler's own thread. Use as a context manager; ``mean()`` averages the samples (0 where
    ``/proc`` is not readable)."""

    def __init__(self, exclude: Callable[[], Sequence[int]] = tuple, interval_s: float = 0.5):
        import threading

        self._exclude = exclude
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.by_session = _autogroups()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-sampler", daemon=True)
        self._tid = 0

    def __enter__(self) -> BackgroundSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    def sample(self) -> float:
        """Groups (or threads) with runnable threads now, other than the excluded ones."""
        skip = set(self._exclude())
        groups: set[int] = set()
        threads = 0
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return 0.0
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                if int(tid) == self._tid:
                    continue
                stat = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
                if not stat or stat[0] != "R" or int(stat[3]) in skip:  # state, ..., session
                    continue
                groups.add(int(stat[3]))
                threads += 1
        return float(len(groups) if self.by_session else threads)

    def _run(self) -> None:
        self._tid = threading_native_id()
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())


def threading_native_id() -> int:
    import threading

    return int(threading.get_native_id())


def _autogroups() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="ascii") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command name (state first), or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


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
        for key in ("replica", "node", "waited", "tier", "load_s", "load"):
            rec[key] = header.get(key)
        return rec

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(trace))))


# --------------------------------------------------------------------------------------------
# prediction, report
# --------------------------------------------------------------------------------------------


def replicas_for(setup: Setup, run: str, cal: Calibration) -> list[ReplicaSpec]:
    sp = cal.speeds()
    if run == "plain":
        plain = (replace(sp["plain"], name="remote"),)
        return [ReplicaSpec(f"node{k}", plain, setup.slots) for k in range(setup.nodes)]
    tiers = (sp["dram"], sp["ssd"], sp["remote"])
    return [
        ReplicaSpec(f"node{k}", tiers, setup.slots, setup.dram_bytes, setup.ssd_bytes)
        for k in range(setup.nodes)
    ]


def compare(measured: Mapping[str, Any], predicted: Mapping[str, Any]) -> dict[str, float]:
    """Relative difference (predicted - measured) / measured of mean, p50 and p99."""
    out = {}
    for key in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s"):
        m = float(measured[key])
        out[key] = (float(predicted[key]) - m) / m if m > 0 else 0.0
    return out


def machine() -> dict[str, Any]:
    import torch

    import fastckpt

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": meminfo().get("MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "transformers": _version("transformers"),
        "fastckpt": getattr(fastckpt, "__version__", ""),
        "load_average": os.getloadavg(),
    }


def _version(module: str) -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(module)
    return ""


def table(data: Mapping[str, Any]) -> str:
    lines = [
        "| run | source | requests | mean TTFT s | p50 TTFT s | p99 TTFT s | waited for a start "
        "| loads dram / ssd / remote | failed |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in RUNS:
        if run not in data["runs"]:
            continue
        for source, s in (("measured", data["runs"][run]), ("simulator", data["predicted"][run])):
            loads = s["loads"]
            lines.append(
                f"| {run} | {source} | {s['requests']} | {s['mean_ttft_s']:.3f} | "
                f"{s['p50_ttft_s']:.3f} | {s['p99_ttft_s']:.3f} | {s['waited']:.0f} | "
                f"{loads['dram']:.0f} / {loads['ssd']:.0f} / {loads['remote']:.0f} | "
                f"{s.get('failed', '')} |"
            )
    return "\n".join(lines)


def plot(data: Mapping[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"plain": "tab:red", "fastckpt": "tab:blue"}
    for run, ttft in data["ttft"].items():
        for source, style in (("measured", "-"), ("simulator", "--")):
            xs = sorted(ttft[source])
            if not xs:
                continue
            ys = [(k + 1) / len(xs) for k in range(len(xs))]
            label = f"{'plain Ray Serve' if run == 'plain' else 'fastckpt'} ({source})"
            ax.step(xs, ys, where="post", linestyle=style, color=colors[run], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Serverless serving on Ray Serve: time to first token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(setup: Setup, workdir: str, out: str, runs: Sequence[str] = RUNS) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the data written to ``out``."""
    from fastckpt.integrations.ray_serve.host import STEP_THREADS
    from fastckpt.sched.sim_serve import simulate_serving

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
        "setup": {**asdict(setup), "models": [asdict(m) for m in setup.models]},
        "model_bytes": sizes,
        "machine": machine(),
        "calibration": {
            "tiers": cal.tiers,
            "compute": {k: asdict(v) for k, v in cal.compute.items()},
            "background": cal.background,
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
        reps = replicas_for(setup, name, cal)
        machine_cpu = Machine(os.cpu_count() or 1, res.background, cal.background)
        kw: dict[str, Any] = {
            "max_ongoing": 8,
            "overhead_s": res.overhead_s,
            "machine": machine_cpu,
            "step_workers": STEP_THREADS,
        }
        pred = predict(reps, sizes, trace, POLICY[name], cal.compute, **kw)
        sim = simulate_serving(reps, sizes, trace, POLICY[name], cal.compute, **kw)
        data["runs"][name] = res.summary()
        data["runs"][name]["wall_s"] = res.wall_s
        data["runs"][name]["overhead_s"] = res.overhead_s
        data["runs"][name]["background"] = res.background
        data["predicted"][name] = pred
        data["difference"][name] = compare(data["runs"][name], pred)
        data["requests"][name] = res.requests
        data["ttft"][name] = {
            "measured": [r["ttft_s"] for r in res.requests if r["ok"]],
            "simulator": list(sim.ttft_s),
        }
        log(f"{name}: {json.dumps(data['runs'][name])}")
        log(f"{name} predicted: mean {pred['mean_ttft_s']:.3f} p50 {pred['p50_ttft_s']:.3f}")
        errors = [r for r in res.requests if not r["ok"]]
        if errors:
            data["notes"].append(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
    data["wall_s"] = time.monotonic() - t_all
    write(data, out)
    return data


def write(data: Mapping[str, Any], out: str) -> dict[str, str]:
    paths = {k: os.path.join(out, f"serverless.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=str)
    m = data["machine"]
    s = data["setup"]
    head = (
        f"# Serverless serving: plain Ray Serve vs fastckpt\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M %z')}; {m['cpu_model']} x{m['cpu_count']}, "
        f"{format_bytes(m['ram_bytes'] or 0)} RAM, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}, transformers {m['transformers']}; "
        f"{s['nodes']} nodes on this machine, {s['slots']} resident models per replica, "
        f"DRAM tier {format_bytes(s['dram_bytes'])} and SSD tier "
        f"{format_bytes(s['ssd_bytes'])} per node; {len(data['trace'])} requests over "
        f"{s['duration_s']:.0f} s (seed {s['seed']}).\n\n"
    )
    diff = "\n".join(
        f"- {run}: simulator vs measured: "
        + ", ".join(f"{k.split('_')[0]} {v:+.0%}" for k, v in d.items())
        for run, d in data["difference"].items()
    )
    notes = "\n".join(f"note: {n}" for n in data.get("notes", ()))
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(head + table(data) + "\n\n" + diff + "\n" + (notes + "\n" if notes else ""))
    plot(data, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastckpt.bench.serverless", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--workdir", required=True, help="models, caches and cluster files")
    ap.add_argument("--out", required=True, help="where serverless.{json,md,png} go")
    ap.add_argument("--quick", action="store_true", help="the small version (2 nodes, 3 models)")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--duration", type=float, help="seconds of trace")
    ap.add_argument("--rate", type=float, help="requests per second per node (mean)")
    ap.add_argument("--dram-budget", help="DRAM tier per node (e.g. 320MB)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--runs", default=",".join(RUNS), help="plain,fastckpt")
    a = ap.parse_args(argv)
    setup = QUICK if a.quick else Setup()
    overrides: dict[str, Any] = {}
    for key, value in (
        ("nodes", a.nodes),
        ("duration_s", a.duration),
        ("rate_per_node", a.rate),
        ("seed", a.seed),
        ("dram_bytes", parse_size(a.dram_budget) if a.dram_budget else None),
    ):
        if value is not None:
            overrides[key] = value
    setup = replace(setup, **overrides)
    runs = [r for r in a.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}")
    data = run(setup, a.workdir, a.out, runs)
    print(table(data))
    return 0 if not data["notes"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
