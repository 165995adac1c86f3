"""Scenario ``serverless``: the small version of the serverless end-to-end benchmark
(``fastckpt.bench.serverless --quick``): a 2-node local Ray cluster, three small models, one
seeded bursty trace replayed against plain Ray Serve and against fastckpt's deployment, and the
simulator's prediction of each.

Rows: one per run, over its requests' time to first token (median, spread; ``x baseline``
against plain Ray Serve); the prediction, waits and loads per tier are in each row's ``extra``,
the full report (``serverless.json``, ``.md``, ``.png``) beside the harness's in ``--out``.
``--size`` and ``--device`` do not apply (CPU, the scenario's own models). Skipped when
``ray[serve]`` is not installed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

from fastckpt.bench.harness import Context, Measurement, Skipped

HELP = "serverless serving on a local Ray cluster: plain Ray Serve vs fastckpt (small version)"
BASELINES = {"serverless": "plain"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--serverless-duration",
        type=float,
        default=None,
        help="serverless: seconds of trace (default: the small version's 30)",
    )


def plan(ctx: Context) -> list[Measurement]:
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise Skipped(
            f"ray[serve] is not installed ({exc}): pip install '.[ray]' from the root of a clone"
        ) from None
    return []


def describe(ctx: Context) -> dict[str, Any]:
    return dict(ctx.shared.get("serverless", {}))


def results_from(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each request of each run as a harness result (seconds = its time to first token)."""
    out = []
    for run, requests in data["requests"].items():
        extra = {
            "measured": data["runs"][run],
            "predicted": {k: v for k, v in data["predicted"][run].items() if k != "spread"},
            "difference": data["difference"][run],
        }
        for r in requests:
            res: dict[str, Any] = {
                "ok": bool(r["ok"]),
                "method": run,
                "state": "-",
                "round": r["i"],
                "nbytes": 0,
                "extra": extra,
            }
            if r["ok"]:
                res["seconds"] = float(r["ttft_s"])
            else:
                res["error"] = str(r.get("error"))
            out.append(res)
    return out


def measure_all(ctx: Context) -> list[dict[str, Any]]:
    from fastckpt.bench import serverless

    setup = serverless.QUICK
    duration = ctx.option("serverless_duration")
    if duration:
        setup = replace(setup, duration_s=float(duration))
    out = os.path.abspath(ctx.args.out)
    data = serverless.run(setup, ctx.workdir, out)
    ctx.shared["serverless"] = {
        "table": serverless.report.table(data),
        "difference": data["difference"],
        "report": os.path.join(out, "serverless.md"),
    }
    return results_from(data)
