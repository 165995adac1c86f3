"""Ray Serve example: place model starts by estimated startup time (fastckpt.sched).

Three replicas of one multiplexed deployment each stand for a server with different storage
state. A request for ``llama-7b`` is routed by ``fastckpt.sched.ray_serve.StartTimeRouter`` to the
replica where the model starts soonest; that replica then loads it.

Run on a local Ray cluster::

    pip install ".[ray]"          # from the root of a clone
    python examples/ray_serve/app.py

In a real deployment ``record_routing_stats`` would describe the replica's own machine: the tier
speeds from ``fastckpt calibrate`` (``MachineProfile.load(...).speeds()``), the checkpoints cached
in each tier, the loads in its queue and the instances it runs; and ``load_model`` would call
``fastckpt.load`` (``CHECKPOINTS`` maps a model name to a checkpoint path).
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from fastckpt.sched.ray_serve import StartTimeRouter

GB = 10**9
TIERS = [
    {"name": "dram", "bandwidth_bps": 24 * GB, "overhead_s": 0.05},
    {"name": "ssd", "bandwidth_bps": 4 * GB, "overhead_s": 0.1},
    {"name": "remote", "bandwidth_bps": 1.25 * GB, "overhead_s": 0.5},
]
MODELS = {"llama-7b": {"nbytes": 14 * GB, "gpus": 1}, "probe": {"nbytes": 1, "gpus": 0}}

#: One server state per replica rank (what each replica reports as its routing stats).
SERVERS: list[dict[str, Any]] = [
    # only remote storage holds llama-7b: 0.5 + 11.2 = 11.7 s
    {"gpus": 1, "free_gpus": 1, "tiers": TIERS, "everywhere": ["remote"]},
    # in DRAM, but three 26 GB loads are queued ahead: 3 x 0.05 + 3.25 + 0.05 + 0.58 = 4.03 s
    {
        "gpus": 1,
        "free_gpus": 1,
        "tiers": TIERS,
        "everywhere": ["remote"],
        "holds": {"dram": ["llama-7b"]},
        "queues": {"dram": {"loads": 3, "nbytes": 78 * GB}},
    },
    # on local SSD with an idle queue: 0.1 + 3.5 = 3.6 s  <- the estimator's pick
    {
        "gpus": 1,
        "free_gpus": 1,
        "tiers": TIERS,
        "everywhere": ["remote"],
        "holds": {"ssd": ["llama-7b"]},
    },
]
CHECKPOINTS: dict[str, str] = {}


@serve.deployment(num_replicas=len(SERVERS), ray_actor_options={"num_cpus": 0})
class ModelHost:
    def __init__(self, servers: list[dict[str, Any]]) -> None:
        ctx = serve.get_replica_context()
        rank = ctx.rank if isinstance(ctx.rank, int) else ctx.rank.rank
        self.rank = rank
        self.name = str(ctx.replica_id.unique_id)
        self.state = servers[rank % len(servers)]

    def record_routing_stats(self) -> dict[str, Any]:
        return self.state

    @serve.multiplexed(max_num_models_per_replica=2)
    async def load_model(self, model_id: str) -> Any:
        path = CHECKPOINTS.get(model_id)
        if path is None:  # nothing to load in the demo
            return {"model": model_id, "loaded_at": time.time()}
        import fastckpt

        return fastckpt.load(path)

    async def __call__(self, request: Any = None) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load_model(model_id)
        return {"replica": self.name, "rank": self.rank, "model": model_id}


def build_app(servers: list[dict[str, Any]] = SERVERS, models: dict[str, Any] = MODELS) -> Any:
    router = RequestRouterConfig(
        request_router_class=StartTimeRouter,
        request_router_kwargs={"models": models, "recompute": {"a": 0.3, "b": 2e-4}},
        request_routing_stats_period_s=0.2,
    )
    return ModelHost.options(request_router_config=router, num_replicas=len(servers)).bind(servers)


def wait_for_routing_stats(handle: Any, timeout_s: float = 60.0) -> None:
    """Send probe requests until the router knows every replica's state."""
    from fastckpt.sched.wire import DECISIONS

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handle.options(multiplexed_model_id="probe").remote().result(timeout_s=timeout_s)
        if DECISIONS and DECISIONS[-1]["model"] == "probe" and DECISIONS[-1]["complete"]:
            return
        time.sleep(0.2)
    raise TimeoutError("the router never received every replica's routing stats")


def main() -> None:
    import ray

    from fastckpt.sched.wire import DECISIONS

    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(), name="fastckpt-sched-demo")
        wait_for_routing_stats(handle)
        out = handle.options(multiplexed_model_id="llama-7b").remote().result()
        decision = DECISIONS[-1]
        print(f"llama-7b started on replica rank {out['rank']} ({out['replica']})")
        print("\n".join(decision["explain"]))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
