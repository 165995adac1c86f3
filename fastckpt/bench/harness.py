"""One harness for every benchmark scenario: registry, fresh-process runner, summary, report.

``fastckpt bench`` measures the loader comparison (scenario ``load``, the default: ``runner.py``)
or one of the scenarios registered here, chosen with ``--scenario``:

- ``engine``: sequential read throughput of the I/O engine (io_uring, pread pool, O_DIRECT and
  buffered), beside fio when it is installed;
- ``load_model``: time to a usable transformers model (stock ``from_pretrained``,
  ``fastckpt.load_model``, the drop-in switch);
- ``lora``: time to attach a LoRA adapter (peft, peft low-memory, ``fastckpt.load_lora``);
- ``convert-memory``: peak host memory of ``fastckpt.convert``;
- ``gpu-sweep``: the loader's pipeline settings (ring, slots, streams, chunk) on one checkpoint;
- ``dram-tier``, ``gpu-tier`` (CUDA): a hit of a ``fastckpt.Loader``'s DRAM / GPU tier (filled
  by an untimed load in the same process) beside loads without a tier, cold and warm;
- ``ssd-tier``: the first load of a stock safetensors checkpoint with the SSD tier on, its copy
  made inline, after the load or beside it, and a second load from the copy, beside no tier;
- ``daemon``: a fresh process loading from a ``fastckpt serve`` daemon beside cold and warm loads;
- ``iterator``: ``fastckpt.iter_tensors`` beside ``fastckpt.load`` (time and peak RSS);
- ``remote``: a checkpoint on a local S3 server (moto): fastckpt streamed, written through to
  the SSD tier and started again from it, beside Run:ai's streamer, download-then-load_file,
  and boto3 against obstore (``fastckpt.bench.scenario_remote``);
- ``gpu-check``: what ``benchmarks/gpu_check.sh`` measures on a lent GPU box, most important
  first, each result written as it comes (``--fake-device``: the same on CPU, a dry run);
- ``vllm``: weight loading inside vLLM (``fastckpt.integrations.vllm.bench``, run by the
  interpreter ``FASTCKPT_VLLM_PYTHON`` names; skipped with a note when it is unset or lacks vLLM);
- ``serverless``: plain Ray Serve against fastckpt's deployment on a local 2-node Ray cluster,
  time to first token over a bursty trace, beside the simulator's prediction (the small version
  of ``fastckpt.bench.serverless``).

Every measurement runs in a fresh process (``python -m fastckpt.bench.worker measure``), which
calls the scenario module's ``measure(spec)``; settings reach it through that process's
environment (``Measurement.env``), never through this process's. Cache state (``cold``: files
dropped from the page cache; ``warm``: read once) is set by the parent before each measurement.
Results become rows (median, min-max, GB/s, peak RSS, speed-up over the scenario's baseline)
written as ``results.json``, ``results.md`` and ``results.png`` under ``--out``, with one
machine description (``machine()``).

Adding a scenario: write ``fastckpt/bench/scenario_<name>.py`` with

- ``HELP`` (one line; a module that serves several scenario names, as ``load_model`` and
  ``lora`` do, also gives ``HELPS``: name -> its line) and ``BASELINES`` (scenario name -> the
  method other rows are compared with);
- ``add_arguments(group)``: its own options (names that do not clash with the shared ones:
  ``--size``, ``--device``, ``--repeats``, ``--states``, ``--workdir``, ``--keep``,
  ``--checkpoint``, ``--out``, ``--python``, ``--worker-timeout-s``);
- ``plan(ctx) -> list[Measurement]``: prepares inputs in ``ctx.workdir`` and lists the
  measurements (each a JSON-able ``spec``, a ``method`` and ``state`` label, and the files whose
  cache state must be set first);
- ``measure(spec) -> dict``: runs in the fresh process, returns at least ``seconds`` and
  ``nbytes`` (``peak_rss_bytes`` is added by the worker), optionally ``extra`` (a dict shown
  in the JSON);
- optionally ``describe(ctx) -> dict``: what the report says about the setup (called after the
  measurements; ``ctx.shared`` carries what ``plan`` or ``context`` noted);
- optionally ``context(ctx)``: a context manager the harness enters after ``plan`` and leaves
  after the last measurement (a resource the measurements use, such as a daemon);
- or, instead of ``measure``, ``measure_all(ctx) -> list[dict]``: for a scenario that runs its
  own processes (in another interpreter, say): replaces the rounds over the plan (``plan`` then
  returns ``[]``); each result as a worker's (``ok``, ``method``, ``state``, ``round``,
  ``seconds``, ``nbytes``, ``error``, ``extra``);

then add its name and module to ``SCENARIOS`` below. ``plan`` raises ``Skipped(reason)`` when the
scenario cannot run here (no CUDA, no vLLM): the report then holds the reason and no rows, and
the exit status is 0. ``tests/bench/test_harness.py`` smoke-runs every registered scenario at
a tiny size, so a new one is covered once it is listed there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from fastckpt.bench.common import drop_from_page_cache, log, median, read_through
from fastckpt.bench.runner import machine_info, run_worker
from fastckpt.rules.units import format_bytes

SCENARIOS: dict[str, str] = {
    "engine": "fastckpt.bench.scenario_engine",
    "load_model": "fastckpt.bench.scenario_load_model",
    "lora": "fastckpt.bench.scenario_load_model",
    "convert-memory": "fastckpt.bench.scenario_convert_memory",
    "gpu-sweep": "fastckpt.bench.scenario_gpu_sweep",
    "dram-tier": "fastckpt.bench.scenario_tiers",
    "gpu-tier": "fastckpt.bench.scenario_tiers",
    "daemon": "fastckpt.bench.scenario_daemon",
    "iterator": "fastckpt.bench.scenario_iterator",
    "vllm": "fastckpt.bench.scenario_vllm",
    "serverless": "fastckpt.bench.scenario_serverless",
    "gpu-check": "fastckpt.bench.scenario_gpu_check",
    "remote": "fastckpt.bench.scenario_remote",
    "ssd-tier": "fastckpt.bench.scenario_ssd",
}
"""Scenario name -> module (see the module docstring for what a module provides)."""


def module_of(name: str) -> ModuleType:
    return importlib.import_module(SCENARIOS[name])


def help_of(name: str) -> str:
    """The one-line description of scenario ``name`` (``HELPS[name]`` of a module that serves
    several scenarios, else its ``HELP``)."""
    module = module_of(name)
    helps: dict[str, str] = getattr(module, "HELPS", {})
    return helps.get(name, module.HELP)


class Skipped(Exception):
    """Raised by a scenario's ``plan``: it cannot run here; the message says why."""


@dataclass
class Measurement:
    """One fresh-process measurement: ``spec`` goes to the module's ``measure``."""

    method: str
    spec: dict[str, Any]
    state: str = "-"  # cold | warm | - (the scenario sets no cache state)
    files: Sequence[str] = ()  # dropped (cold) or read (warm) before the measurement
    env: dict[str, str] = field(default_factory=dict)  # added to the child's environment


@dataclass
class Context:
    """What a scenario's ``plan`` gets: the parsed options and where to put files."""

    scenario: str
    args: argparse.Namespace
    workdir: str
    size_bytes: int
    device: str
    states: tuple[str, ...]
    shared: dict[str, Any] = field(default_factory=dict)  # the scenario's own notes

    def option(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default)


def _peak_rss_note() -> str:
    return "peak RSS is the measuring process's VmHWM (imports included)"


@contextlib.contextmanager
def entered(module: ModuleType, ctx: Context) -> Iterator[None]:
    """The scenario module's ``context(ctx)`` when it has one (see the module docstring)."""
    hook = getattr(module, "context", None)
    if hook is None:
        yield
        return
    with hook(ctx):
        yield


def run_scenario(
    name: str, args: argparse.Namespace, *, size_bytes: int, device: str, states: Sequence[str]
) -> int:
    """Plan, measure (interleaved over ``args.repeats`` rounds), summarise and report."""
    module = module_of(name)
    workdir = os.path.join(os.path.abspath(args.workdir), name.replace("-", "_"))
    os.makedirs(workdir, exist_ok=True)
    ctx = Context(name, args, workdir, size_bytes, device, tuple(states))
    try:
        results: list[dict[str, Any]] = []
        notes = [_peak_rss_note()]
        skipped = False
        try:
            plan = module.plan(ctx)
        except Skipped as exc:
            plan, notes, skipped = [], [f"skipped: {exc}"], True
            log(f"{name}: skipped: {exc}")
        host = machine(workdir, device, args.python)
        try:
            if not skipped:
                with entered(module, ctx):
                    if hasattr(module, "measure_all"):
                        results.extend(module.measure_all(ctx))
                    else:
                        _measure_rounds(name, module.__name__, plan, args, device, results)
        except (KeyboardInterrupt, SystemExit):  # a time limit: report what was measured
            notes.append(f"stopped early after {len(results)} measurement(s)")
        rows = summarise(results, getattr(module, "BASELINES", {}).get(name))
        data = {
            "scenario": name,
            "options": {k: v for k, v in vars(args).items() if _jsonable(v)},
            "machine": host,
            "setup": getattr(module, "describe", lambda c: {})(ctx),
            "rows": rows,
            "runs": [{k: v for k, v in r.items() if k != "output"} for r in results],
            "notes": notes,
        }
        paths = write_report(data, os.path.abspath(args.out))
        print(table_markdown(rows))
        for note in notes:
            print(f"note: {note}")
        log(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
        if len(notes) > 1:
            return 1
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _measure_rounds(
    name: str,
    module: str,
    plan: Sequence[Measurement],
    args: argparse.Namespace,
    device: str,
    results: list[dict[str, Any]],
) -> None:
    """``args.repeats`` rounds over ``plan``, the order rotated by one each round."""
    for rnd in range(args.repeats):
        order = [*plan[rnd % len(plan) :], *plan[: rnd % len(plan)]] if plan else []
        for m in order:
            _set_state(m.state, m.files)
            spec = json.dumps({**m.spec, "device": device})
            res = run_worker(
                args.python,
                "measure",
                ["--module", module, "--spec", spec],
                timeout_s=args.worker_timeout_s,
                env=m.env or None,
            )
            res.update(method=m.method, state=m.state, round=rnd)
            shown = f"{res['seconds']:.3f} s" if res.get("ok") else f"ERROR {res.get('error')}"
            log(f"{name}: round {rnd} {m.state:5} {m.method:28} {shown}")
            results.append(res)


def _set_state(state: str, files: Sequence[str]) -> None:
    if not files or state == "-":
        return
    if state == "cold":
        drop_from_page_cache(files)
    elif state == "warm":
        read_through(list(files))
    else:
        raise ValueError(f"unknown cache state {state!r}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def machine(workdir: str, device: str, python: str) -> dict[str, Any]:
    """The one machine description (CPU, memory, disk under ``workdir``, OS, Python, torch,
    GPU, fastckpt and its engine), from a probe in a fresh process."""
    probe = run_worker(python, "probe", ["--device", device], timeout_s=300)
    return machine_info(workdir, shutil.which("fio"), probe.get("probe", {}))


def summarise(results: Sequence[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """One row per (state, method): median, spread, GB/s, peak RSS, speed-up over ``baseline``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["state"], r["method"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (state, method), runs in groups.items():
        ok = [r for r in runs if r.get("ok")]
        row: dict[str, Any] = {
            "state": state,
            "method": method,
            "runs": len(runs),
            "ok_runs": len(ok),
            "errors": sorted({str(r.get("error")) for r in runs if not r.get("ok")}),
        }
        if ok:
            secs = [float(r["seconds"]) for r in ok]
            med = median(secs)
            nbytes = int(ok[0].get("nbytes") or 0)
            row.update(
                median_s=med,
                min_s=min(secs),
                max_s=max(secs),
                gbps=nbytes / med / 1e9 if med > 0 and nbytes else None,
                peak_rss_bytes=max(int(r.get("peak_rss_bytes") or 0) for r in ok),
                extra=ok[0].get("extra", {}),
            )
        rows.append(row)
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["state"] == row["state"] and r["method"] == baseline and "median_s" in r
            ),
            None,
        )
        same_kind = base is not None and (
            row["method"].partition(":")[0] == base["method"].partition(":")[0]
            if ":" in base["method"]
            else True
        )
        if base is not None and same_kind and row.get("median_s"):
            row["speedup"] = base["median_s"] / row["median_s"]
    return rows


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| state | method | median s | min-max s | GB/s | x baseline | peak RSS | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['state']} | {r['method']} | ERROR: {r['errors'][0]} | | | | | 0 |")
            continue
        gbps = f"{r['gbps']:.2f}" if r.get("gbps") else "n/a"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
        lines.append(
            f"| {r['state']} | {r['method']} | {r['median_s']:.3f} | "
            f"{r['min_s']:.3f}-{r['max_s']:.3f} | {gbps} | {speed} | "
            f"{format_bytes(r['peak_rss_bytes'])} | {r['ok_runs']}/{r['runs']} |"
        )
    return "\n".join(lines)


def write_report(data: dict[str, Any], out_dir: str) -> dict[str, str]:
    """``results.json`` (everything), ``results.md`` (machine + table), ``results.png``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=str)
    m = data["machine"]
    head = (
        f"# fastckpt bench --scenario {data['scenario']}\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}; {m.get('cpu_model')} x{m.get('cpu_count')}, "
        f"{format_bytes(m.get('ram_bytes') or 0)} RAM, GPU {m.get('gpu') or 'none'}, "
        f"{m.get('os')} ({platform.release()}), torch {m.get('torch')}; workdir on "
        f"{m.get('workdir_fs')}\n\n"
    )
    lines = [head + table_markdown(data["rows"]), *(f"note: {n}" for n in data.get("notes", ()))]
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(data["rows"], paths["png"], data["scenario"])
    return paths


def _plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON and the table are the results; the chart is a convenience
        with open(path, "wb"):
            pass
        return
    good = [r for r in rows if "median_s" in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(good)), 4))
    ax.bar(range(len(good)), [r["median_s"] for r in good])
    ax.set_xticks(range(len(good)), [f"{r['state']}\n{r['method']}" for r in good], fontsize=7)
    ax.set_ylabel("median seconds")
    ax.set_title(f"fastckpt bench --scenario {title}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scratch(ctx: Context, name: str) -> str:
    """A fresh folder ``name`` in the scenario's workdir."""
    path = os.path.join(ctx.workdir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


__all__ = [
    "SCENARIOS",
    "Context",
    "Measurement",
    "Skipped",
    "entered",
    "machine",
    "module_of",
    "run_scenario",
    "scratch",
    "summarise",
    "table_markdown",
    "write_report",
]
