"""The Ray Serve example on a small local Ray cluster: the start lands where the estimator says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fastckpt.sched import Estimator, ModelSpec, RecomputeModel
from fastckpt.sched.wire import server_from_dict

pytest.importorskip(
    "ray.serve", reason="ray[serve] is not installed (pip install '.[ray]' from the clone)"
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_serve" / "app.py"


def _example():
    spec = importlib.util.spec_from_file_location("fastckpt_ray_serve_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# A local Ray cluster (GCS, raylet, workers, Serve's controller and replicas) is a minute of both
# cores: the main suite leaves it to CI's slow step (`python3 -m pytest -q -m slow`).
@pytest.mark.slow
def test_model_start_lands_on_the_replica_the_estimator_picks() -> None:
    import ray
    from ray import serve

    from fastckpt.sched.wire import DECISIONS

    app = _example()
    # the estimator's own answer from the same plain data, independent of Ray
    servers = [server_from_dict(f"rank{k}", s) for k, s in enumerate(app.SERVERS)]
    spec = app.MODELS["llama-7b"]
    model = ModelSpec("llama-7b", spec["nbytes"], spec["gpus"])
    expected = Estimator(RecomputeModel(0.3, 2e-4)).pick(servers, model).server
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(app.build_app(), name="fastckpt-sched-test")
        app.wait_for_routing_stats(handle, timeout_s=120)
        out = handle.options(multiplexed_model_id="llama-7b").remote().result(timeout_s=120)
        decision = DECISIONS[-1]
        assert decision["model"] == "llama-7b" and decision["complete"]
        assert out["replica"] == decision["chosen"]
        assert f"rank{out['rank']}" == expected
        ranking = [name for name, _ in decision["ranking"]]
        assert ranking[0] == out["replica"] and len(ranking) == len(app.SERVERS)
    finally:
        serve.shutdown()
        ray.shutdown()
