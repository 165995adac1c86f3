"""The serverless benchmark's prediction and report, from its data alone (``serverless.json``):
the simulator's replay of the trace on the calibrated tiers (``predict_all``), the table, the
notes and the CDF plot (``write``). ``python -m fastckpt.bench.serverless --repredict
O/serverless.json --out O`` runs these again on a finished run (after a change to the simulator
or the estimator) without starting a cluster."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

from fastckpt.bench.common import cpu_model
from fastckpt.bench.serverless_prep import coruns_of
from fastckpt.integrations.ray_serve.state import STEP_THREADS
from fastckpt.rules.host import meminfo
from fastckpt.rules.units import format_bytes
from fastckpt.sched.model import TierSpeed
from fastckpt.sched.sim_serve import (
    ComputeCost,
    Machine,
    ReplicaSpec,
    ServeRequest,
    predict,
    simulate_serving,
)

RUNS = ("plain", "fastckpt")
POLICY = {"plain": "default", "fastckpt": "start-time"}
#: How late Ray Serve's default router sees a replica's model ids: the replica pushes them every
#: 0.1 s (``ray.serve._private.constants.PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S`` in Ray 2.60)
#: to the controller, which passes them on to the routers. A run records Ray's value.
IDS_LAG_S = 0.1
AGREEMENT = 0.25  # the simulator should predict the measured mean and p50 within 25%
MAX_ONGOING = 8  # requests in flight per replica (``build_app``'s ``max_ongoing_requests``)


def replicas_from(data: Mapping[str, Any], run: str) -> list[ReplicaSpec]:
    """The simulated replicas of ``run``: the calibrated tiers (``plain``: ``from_pretrained``
    from the store, no tiers) with the setup's slots and budgets."""
    setup = data["setup"]
    sp = {
        t: TierSpeed(t, f["bandwidth_bps"], f["overhead_s"])
        for t, f in data["calibration"]["tiers"].items()
    }
    nodes, slots = int(setup["nodes"]), int(setup["slots"])
    if run == "plain":
        plain = (TierSpeed("remote", sp["plain"].bandwidth_bps, sp["plain"].overhead_s),)
        return [ReplicaSpec(f"node{k}", plain, slots) for k in range(nodes)]
    tiers = (sp["dram"], sp["ssd"], sp["remote"])
    return [
        ReplicaSpec(f"node{k}", tiers, slots, int(setup["dram_bytes"]), int(setup["ssd_bytes"]))
        for k in range(nodes)
    ]


def predict_all(data: dict[str, Any]) -> None:
    """The simulator's prediction of every measured run, beside it in ``data`` (``predicted``,
    ``difference``, ``ttft[run]["simulator"]``, ``disagreements``), and a second one on the
    load speeds the run's own replicas observed (``predicted_observed``): where the two
    differ, the calibration did not describe the loads in the run."""
    data["disagreements"] = []
    data["predicted_observed"] = {}
    data["observed_tiers"] = {}
    for name, measured in data["runs"].items():
        pred, ttft = _predict(data, name, data["calibration"]["tiers"])
        data["predicted"][name] = pred
        data["difference"][name] = compare(measured, pred)
        data["ttft"].setdefault(name, {})["simulator"] = ttft
        for key in ("mean_ttft_s", "p50_ttft_s"):
            d = data["difference"][name][key]
            if abs(d) > AGREEMENT:
                data["disagreements"].append(f"{name} {key.split('_')[0]}: simulator {d:+.0%}")
        seen = observed_tiers(data, name)
        data["observed_tiers"][name] = seen
        if seen:
            tiers = {t: {**f, **seen.get(t, {})} for t, f in data["calibration"]["tiers"].items()}
            obs, _ = _predict(data, name, tiers)
            obs["difference"] = compare(measured, obs)
            data["predicted_observed"][name] = obs


def _predict(
    data: Mapping[str, Any], name: str, tiers: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], list[float]]:
    """(the summary averaged over seeds, one seed's time to first token per request) of run
    ``name`` on ``tiers``."""
    trace = [ServeRequest(r["t"], r["model"], r["tokens"]) for r in data["trace"]]
    cal = data["calibration"]
    compute = {k: ComputeCost(**v) for k, v in cal["compute"].items()}
    sizes = {k: int(v) for k, v in data["model_bytes"].items()}
    measured = data["runs"][name]
    kw: dict[str, Any] = {
        "max_ongoing": MAX_ONGOING,
        "overhead_s": float(measured["overhead_s"]),
        "machine": Machine(
            float(data["machine"]["cpu_count"] or 1),
            float(measured["background"]),
            float(cal["background"]),
        ),
        "step_workers": STEP_THREADS,
        # runs made before the co-run calibration: equal sharing
        "corun": coruns_of(cal.get("corun") or {}).get(name),
        "ids_lag_s": float(data["setup"].get("ids_lag_s", IDS_LAG_S)),
    }
    reps = replicas_from({**data, "calibration": {**cal, "tiers": tiers}}, name)
    pred = predict(reps, sizes, trace, POLICY[name], compute, **kw)
    sim = simulate_serving(reps, sizes, trace, POLICY[name], compute, **kw)
    return pred, list(sim.ttft_s)


def observed_tiers(data: Mapping[str, Any], run: str) -> dict[str, dict[str, float]]:
    """Each tier's ``overhead + bytes / bandwidth`` fitted on the loads the run's replicas
    timed (each load once; tiers with loads of fewer than 2 sizes are left out), under the
    calibration's tier names (plain's loads are its ``plain`` tier)."""
    from fastckpt.sched.model import SchedError
    from fastckpt.sched.profile import Sample, fit_tier

    sizes = data["model_bytes"]
    loads: dict[str, tuple[str, int, float]] = {}
    for r in data["requests"].get(run, ()):
        if r.get("ok") and r.get("waited") and r.get("load") and r.get("load_s"):
            loads.setdefault(r["load"], (r["tier"], int(sizes[r["model"]]), float(r["load_s"])))
    by: dict[str, list[Sample]] = {}
    for tier, nbytes, seconds in loads.values():
        by.setdefault("plain" if run == "plain" else tier, []).append(Sample(nbytes, seconds))
    out = {}
    for tier, samples in by.items():
        try:
            f = fit_tier(samples, warmup=0)
        except SchedError:
            continue
        out[tier] = {"bandwidth_bps": f.bandwidth_bps, "overhead_s": f.overhead_s,
                     "loads": len(samples)}  # fmt: skip
    return out


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
        rows = [("measured", data["runs"][run]), ("simulator", data["predicted"][run])]
        if run in data.get("predicted_observed", {}):
            rows.append(("simulator, observed load speeds", data["predicted_observed"][run]))
        for source, s in rows:
            loads = s["loads"]
            lines.append(
                f"| {run} | {source} | {s['requests']} | {s['mean_ttft_s']:.3f} | "
                f"{s['p50_ttft_s']:.3f} | {s['p99_ttft_s']:.3f} | {s['waited']:.0f} | "
                f"{loads['dram']:.0f} / {loads['ssd']:.0f} / {loads['remote']:.0f} | "
                f"{s.get('failed', '')} |"
            )
    return "\n".join(lines)


def breakdown(data: Mapping[str, Any]) -> str:
    """Where each run's time to first token went, by kind of request (mean seconds): resident
    models, and starts by tier. ``wait`` is from the request's arrival at the replica until
    its model was there (its own start, or the model lock behind other starts), ``load`` the
    start itself, ``routing`` the rest until the reply's header (router, calls), ``first
    token`` from the header to the first token (the prefill step and the stream)."""
    lines = [
        "| run | requests | n | TTFT | routing | wait for the model | of which its load "
        "| first token | simulator TTFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in RUNS:
        sim = data.get("ttft", {}).get(run, {}).get("simulator") or []
        groups: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
        for k, r in enumerate(data["requests"].get(run, ())):
            if not r.get("ok") or r.get("header_s") is None or r.get("wait_s") is None:
                continue
            kind = f"start from {r['tier']}" if r.get("waited") else "resident"
            groups.setdefault(kind, []).append((r, sim[k] if k < len(sim) else None))
        for kind in sorted(groups):
            rows = groups[kind]

            def mean(fn: Any, rows: Any = rows) -> float:
                return sum(fn(r) for r, _ in rows) / len(rows)

            sims = [x for _, x in rows if x is not None]
            lines.append(
                f"| {run} | {kind} | {len(rows)} | {mean(lambda r: r['ttft_s']):.3f} | "
                f"{mean(lambda r: r['header_s'] - r['wait_s']):.3f} | "
                f"{mean(lambda r: r['wait_s']):.3f} | {mean(lambda r: r.get('load_s') or 0):.3f} | "
                f"{mean(lambda r: r['ttft_s'] - r['header_s']):.3f} | "
                + (f"{sum(sims) / len(sims):.3f} |" if sims else "|")
            )
    return "\n".join(lines) if len(lines) > 2 else ""


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


def write(data: Mapping[str, Any], out: str) -> dict[str, str]:
    """``serverless.json``, ``.md`` and ``.png`` in ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
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
    off = data.get("disagreements") or []
    if off:
        diff += f"\n- more than {AGREEMENT:.0%} apart: " + "; ".join(off)
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(head + table(data) + "\n\n" + diff + "\n" + (notes + "\n" if notes else ""))
        parts = breakdown(data)
        if parts:
            fh.write("\nWhere the time to first token went (mean seconds):\n\n" + parts + "\n")
    plot(data, paths["png"])
    return paths


def ids_lag_s() -> float:
    """Ray Serve's model-id push interval in the Ray installed here (``IDS_LAG_S`` if Ray does
    not say)."""
    with contextlib.suppress(Exception):
        from ray.serve._private import constants

        return float(constants.PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S)
    return IDS_LAG_S
