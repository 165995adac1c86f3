"""Scenario ``daemon``: a fresh process loading a checkpoint from a ``fastckpt serve`` cache
daemon beside fresh processes loading it from the page cache (``warm``) and from storage
(``cold``), on the same bytes (the modes of ``fastckpt/serve/bench.py``).

Before the measurements the harness enters ``context``: a daemon on a temporary socket whose
root is the checkpoint's folder, the checkpoint prefetched into it (``serve.bench.serving``);
it is stopped after the last one. The ``daemon`` rows have ``FASTCKPT_SERVER`` in their
environment and fail when the daemon does not serve; the others have it empty. Each process
times its load and the first full touch (``serve.bench.load_and_touch``; ``extra`` splits
them). The daemon rows run in both cache states: the daemon's copy does not depend on them.
The checkpoint is ``--checkpoint`` (a fastckpt checkpoint) or one generated of ``--size``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from fastckpt.bench.harness import Context, Measurement
from fastckpt.bench.scenario_tiers import checkpoint

HELP = "a fresh process loading from a fastckpt serve daemon beside cold and warm loads"
BASELINES = {"daemon": "fastckpt.load"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """No options of its own: ``--checkpoint``, ``--size``, ``--device``, ``--states``."""


def plan(ctx: Context) -> list[Measurement]:
    path, files = checkpoint(ctx)
    # a short path: a Unix socket's name has room for about 100 bytes
    sock = os.path.join(tempfile.gettempdir(), f"fastckpt-bench-{os.getpid()}", "sock")
    ctx.shared.update(checkpoint=os.path.realpath(path), socket=sock)
    out = []
    for state in ctx.states:
        for method, mode, server in (
            ("fastckpt.load", "files", ""),
            ("daemon", "daemon", sock),
        ):
            spec = {"path": ctx.shared["checkpoint"], "mode": mode}
            env = {"FASTCKPT_SERVER": server}
            out.append(Measurement(method, spec, state=state, files=files, env=env))
    return out


@contextlib.contextmanager
def context(ctx: Context) -> Iterator[None]:
    """The daemon, running and holding the checkpoint, while the measurements run."""
    from fastckpt.bench.runner import BenchError
    from fastckpt.serve.bench import serving
    from fastckpt.serve.client import ServerRefused

    sock = ctx.shared["socket"]
    try:
        with contextlib.ExitStack() as stack:
            try:
                info = stack.enter_context(serving(ctx.shared["checkpoint"], sock))
            except (RuntimeError, OSError, ServerRefused) as exc:
                raise BenchError(f"the cache daemon did not start or fill: {exc}") from exc
            ctx.shared["daemon_fill_s"] = info["fill_s"]
            yield
    finally:
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


def describe(ctx: Context) -> dict[str, Any]:
    return {
        "checkpoint": ctx.option("checkpoint") or "generated",
        "socket": ctx.shared.get("socket"),
        "daemon_fill_s": ctx.shared.get("daemon_fill_s"),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from fastckpt.serve.bench import load_and_touch

    row = load_and_touch(spec["mode"], spec["path"], spec["device"])
    extra = {k: row[k] for k in ("load_s", "touch_s", "taken")}
    return {"seconds": row["load_s"] + row["touch_s"], "nbytes": row["nbytes"], "extra": extra}
