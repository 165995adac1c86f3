"""StartTimeRouter on a small local Ray cluster, on replica states given as data: the start lands
where the estimator says, and starts under way are joined. (The real deployment, whose replicas
report their own tiers, is tested on a 2-node cluster in tests/cluster.)"""

from __future__ import annotations

import time
from typing import Any

import pytest

from fastckpt.sched import Estimator, ModelSpec, RecomputeModel
from fastckpt.sched.wire import server_from_dict

pytest.importorskip(
    "ray.serve", reason="ray[serve] is not installed (pip install '.[ray]' from the clone)"
)

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


@serve.deployment(num_replicas=len(SERVERS), ray_actor_options={"num_cpus": 0})
class StatedHost:
    """A replica that reports a given state and loads nothing."""

    def __init__(self, servers: list[dict[str, Any]]) -> None:
        ctx = serve.get_replica_context()
        rank = ctx.rank if isinstance(ctx.rank, int) else ctx.rank.rank
        self.rank = rank
        self.name = str(ctx.replica_id.unique_id)
        self.state = servers[rank % len(servers)]

    def record_routing_stats(self) -> dict[str, Any]:
        return self.state

    async def __call__(self) -> dict[str, Any]:
        return {"replica": self.name, "rank": self.rank, "model": serve.get_multiplexed_model_id()}


def _app(reservations: str) -> Any:
    router = RequestRouterConfig(
        request_router_class=StartTimeRouter,
        request_router_kwargs={
            "models": MODELS,
            "recompute": {"a": 0.3, "b": 2e-4},
            "reservations": reservations,
            "reservations_name": f"test-reservations-{reservations}",
        },
        request_routing_stats_period_s=0.2,
    )
    return StatedHost.options(request_router_config=router).bind(SERVERS)


def _wait_for_stats(handle: Any, timeout_s: float = 120.0) -> None:
    from fastckpt.sched.wire import DECISIONS

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handle.options(multiplexed_model_id="probe").remote().result(timeout_s=timeout_s)
        if DECISIONS and DECISIONS[-1]["model"] == "probe" and DECISIONS[-1]["complete"]:
            return
        time.sleep(0.2)
    raise TimeoutError("the router never received every replica's routing stats")


@pytest.fixture(scope="module")
def ray_local() -> Any:
    import ray

    ray.init(
        address="local",  # a Ray instance of its own, never one another job started
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        serve.start(proxy_location="Disabled")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


# A local Ray cluster (GCS, raylet, workers, Serve's controller and replicas) is a minute of both
# cores: the main suite leaves it to CI's slow step (`python3 -m pytest -q -m slow`).
@pytest.mark.slow
@pytest.mark.parametrize("reservations", ["actor", "off"])
def test_model_start_lands_on_the_replica_the_estimator_picks(ray_local, reservations) -> None:
    from fastckpt.sched.wire import DECISIONS

    # the estimator's own answer from the same plain data, independent of Ray
    servers = [server_from_dict(f"rank{k}", s) for k, s in enumerate(SERVERS)]
    spec = MODELS["llama-7b"]
    model = ModelSpec("llama-7b", spec["nbytes"], spec["gpus"])
    expected = Estimator(RecomputeModel(0.3, 2e-4)).pick(servers, model).server
    handle = serve.run(_app(reservations), name=f"sched-{reservations}")
    _wait_for_stats(handle)
    if reservations == "actor":  # the shared book answers once its actor has started
        deadline = time.monotonic() + 120
        while DECISIONS[-1].get("book") != "shared":
            assert time.monotonic() < deadline, DECISIONS[-1]
            time.sleep(0.2)
            handle.options(multiplexed_model_id="probe").remote().result(timeout_s=120)
    out = handle.options(multiplexed_model_id="llama-7b").remote().result(timeout_s=120)
    decision = DECISIONS[-1]
    assert decision["model"] == "llama-7b" and decision["complete"]
    assert out["replica"] == decision["chosen"]
    assert f"rank{out['rank']}" == expected
    ranking = [name for name, _ in decision["ranking"]]
    assert ranking[0] == out["replica"] and len(ranking) == len(SERVERS)
    if reservations == "actor":
        # the start is reserved: the next request for the model joins it (the stated replicas
        # never report it as loading, so only the reservation can say where it starts)
        assert decision["reserved"] == out["replica"]
        again = handle.options(multiplexed_model_id="llama-7b").remote().result(timeout_s=120)
        assert again["replica"] == out["replica"]
        assert DECISIONS[-1]["underway"] == [out["replica"]] and not DECISIONS[-1]["ranking"]
    else:
        assert decision["reserved"] is None
    serve.delete(f"sched-{reservations}")


class _FakeActor:
    """A reservation actor's methods over a plain book; ``fail`` makes its calls raise."""

    def __init__(self, first: Any) -> None:
        from fastckpt.sched.reserve import ReservationBook

        self.book = ReservationBook(3.0)
        self.first = first
        self.fail = False
        outer = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args: Any) -> Any:
                if self.name == "counts":
                    return type("Ref", (), {"future": lambda _self: outer.first})()
                return outer._call(self.name, *args)

        self.counts = Method("counts")
        self.snapshot = Method("snapshot")
        self.claim = Method("claim")

    async def _call(self, name: str, *args: Any) -> Any:
        if self.fail:
            raise ConnectionError("the actor died")
        if name == "snapshot":
            return self.book.snapshot()
        server, model, tier, nbytes, version, owner = args
        return self.book.claim(server, model, tier, nbytes, version=version, owner=owner)


def test_router_keeps_its_own_book_until_the_shared_one_answers() -> None:
    import asyncio
    from concurrent.futures import Future

    from fastckpt.sched.ray_serve import _Book

    first: Future[Any] = Future()
    actor = _FakeActor(first)
    book = _Book("actor", 3.0, "test-book")
    book._handle = lambda: actor  # type: ignore[method-assign]
    book.warm()

    async def scenario() -> None:
        # the actor has not answered yet: the router's own book, without waiting
        snap, shared = await book.snapshot()
        assert snap is not None and not shared and snap.reservations == ()
        got = await book.claim("a", "m", "remote", 10, snap.version, shared)
        assert got is not None and got.ok
        snap, shared = await book.snapshot()
        assert not shared and [r.server for r in snap.reservations] == ["a"]
        # it answered: the shared book from now on
        first.set_result({"claims": 0, "conflicts": 0})
        snap, shared = await book.snapshot()
        assert shared and snap.reservations == ()
        got = await book.claim("b", "m", "remote", 10, snap.version, shared)
        assert got is not None and got.ok
        assert [r.server for r in actor.book.snapshot().reservations] == ["b"]
        # it fails: back to the router's own book (its reservation still there)
        actor.fail = True
        snap, shared = await book.snapshot()
        assert not shared and [r.server for r in snap.reservations] == ["a"]

    asyncio.run(scenario())
