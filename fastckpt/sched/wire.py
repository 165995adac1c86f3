"""A server's state as JSON-able plain data, for passing between processes (e.g. Ray Serve's
replica routing stats) and for configuration files.

Shape::

    {"gpus": 8, "free_gpus": 2,
     "tiers": [{"name": "dram", "bandwidth_bps": 2.4e10, "overhead_s": 0.05}, ...],
     "holds": {"dram": ["llama-7b"]}, "everywhere": ["remote"],
     "queues": {"ssd": {"loads": 1, "nbytes": 1.4e10}},
     "running": [{"id": "i3", "model": "llama-13b", "gpus": 2, "tokens": 900}],
     "serial": true}

``serial`` (default false): the server runs one load at a time whatever its tier (see
``fastckpt.sched.Server``). Keys not listed here are ignored, so a producer may add its own
(a Ray Serve replica adds what it holds and what it is loading, for people and logs).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from fastckpt.sched.model import Instance, SchedError, Server, TierQueue, TierSpeed, make_server

#: Recent placement decisions of routers in this process (fastckpt.sched.ray_serve): dicts with
#: the model, the chosen replica, the ranking and each estimate's explanation.
DECISIONS: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
#: Replica name -> its latest routing stats as routers in this process received them: the
#: report's own time ``at``, the arrival time ``received``, and what it held (resident models,
#: tier holdings, loads in progress).
VIEWS: dict[str, dict[str, Any]] = {}


def server_to_dict(server: Server) -> dict[str, Any]:
    return {
        "gpus": server.gpus,
        "free_gpus": server.free_gpus,
        "tiers": [
            {"name": t.name, "bandwidth_bps": t.bandwidth_bps, "overhead_s": t.overhead_s}
            for t in server.tiers
        ],
        "holds": {k: sorted(v) for k, v in sorted(server.holds.items())},
        "everywhere": sorted(server.everywhere),
        "queues": {k: {"loads": q.loads, "nbytes": q.nbytes} for k, q in server.queues.items()},
        "running": [
            {"id": i.id, "model": i.model, "gpus": i.gpus, "tokens": i.tokens}
            for i in server.running
        ],
        "serial": server.serial,
    }


def server_from_dict(name: str, data: Mapping[str, Any]) -> Server:
    """Rebuild a ``Server`` named ``name``; a malformed mapping raises SchedError."""
    if not isinstance(data, Mapping):
        raise SchedError(f"server {name!r}: state must be a mapping, got {type(data).__name__}")
    try:
        tiers = [
            TierSpeed(str(t["name"]), float(t["bandwidth_bps"]), float(t.get("overhead_s", 0.0)))
            for t in data["tiers"]
        ]
        queues = {
            str(k): TierQueue(int(q.get("loads", 0)), int(q.get("nbytes", 0)))
            for k, q in dict(data.get("queues", {})).items()
        }
        running = [
            Instance(str(i["id"]), str(i["model"]), int(i["gpus"]), int(i.get("tokens", 0)))
            for i in data.get("running", [])
        ]
        gpus = int(data["gpus"])
        free = data.get("free_gpus")
        serial = data.get("serial", False)
        if not isinstance(serial, bool):
            raise SchedError(f"server {name!r}: serial must be true or false, got {serial!r}")
        return make_server(
            name,
            tiers,
            gpus=gpus,
            free_gpus=None if free is None else int(free),
            holds={str(k): [str(m) for m in v] for k, v in dict(data.get("holds", {})).items()},
            queues=queues,
            running=running,
            everywhere=[str(t) for t in data.get("everywhere", [])],
            serial=serial,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, SchedError):
            raise
        raise SchedError(
            f"server {name!r}: malformed state ({type(exc).__name__}: {exc})"
        ) from None
