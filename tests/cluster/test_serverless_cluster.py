"""The serving deployment on a real 2-node local Ray cluster (the acceptance test of issue 24).

Two small models (a Llama and a Qwen2 with random weights, stock safetensors folders), one
replica per node keeping one model resident, the start-time router with reservations, tier
speeds from a machine profile file. Before the deployment starts, node1's SSD tier is given a
converted copy of ``llama`` and node0's of ``qwen``, so that the holder of each model is known
and independent of the replicas' names. Checked:

- each model's first request goes to the node whose SSD tier holds it (and loads from ``ssd``);
- a load and an eviction are in the routing stats the router receives within one reporting
  period (plus Ray Serve's propagation) after they happen;
- when the replica serving ``qwen`` is busy (one request at a time), the next ``qwen`` request
  starts it on the other node, which evicts ``llama`` there into its DRAM tier; the next
  ``llama`` request then goes to that node and loads from ``dram``;
- every response is the greedy continuation ``from_pretrained`` gives.

The cluster is started and stopped by the test (process groups, bounded waits), on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastckpt  # noqa: E402
from fastckpt.bench.ray_cluster import LocalCluster, NodeSpec  # noqa: E402
from fastckpt.integrations.ray_serve.catalog import Catalog  # noqa: E402
from fastckpt.integrations.ray_serve.host import build_app, greedy_tokens  # noqa: E402
from fastckpt.sched.profile import MachineProfile, TierProfile  # noqa: E402

PERIOD_S = 1.0
#: Ray Serve's controller calls record_routing_stats every period (x 0.9-1.1) and pushes the
#: result to routers through a long poll: the view may lag a report by this much.
PROPAGATION_S = 2.0
PROMPT = [5, 17, 3, 42, 8]


def _models(root: Path) -> dict[str, str]:
    small = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    out = {}
    for name, cls, cfg, seed in (
        ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**small), 1),
        ("qwen", transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small), 2),
    ):
        torch.manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        path = root / name
        model.save_pretrained(path)
        out[name] = str(path)
    return out


def _profile(path: Path) -> str:
    tiers = {  # a node whose DRAM is faster than its SSD, faster than remote storage
        "dram": TierProfile("dram", 5e9, 0.01, 5e9),
        "ssd": TierProfile("ssd", 1e9, 0.02, 1e9),
        "remote": TierProfile("remote", 1e8, 0.2, 1e8),
    }
    MachineProfile("cpu", tiers).save(path)
    return str(path)


def _node_ids() -> dict[str, str]:
    import ray

    out = {}
    for n in ray.nodes():
        for name in ("node0", "node1"):
            if n.get("Alive") and name in n.get("Resources", {}):
                out[name] = n["NodeID"]
    return out


async def _ask(handle: Any, model: str, tokens: int) -> tuple[dict[str, Any], list[int]]:
    header: dict[str, Any] = {}
    got: list[int] = []
    gen = handle.options(multiplexed_model_id=model, stream=True).generate.remote(PROMPT, tokens)
    async for item in gen:
        if isinstance(item, dict):
            header = item
        else:
            got.append(item)
    return header, got


def _wait_view(replica: str, check: Any, since: float, timeout_s: float) -> dict[str, Any]:
    """The first view of ``replica`` the router received that passes ``check``."""
    from fastckpt.sched.wire import VIEWS

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = VIEWS.get(replica)
        if view is not None and view["at"] >= since and check(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"no view of {replica} passed the check in {timeout_s} s: {VIEWS}")


def test_two_node_cluster_routes_by_tiers_and_reports_loads_and_evictions(tmp_path: Path) -> None:
    from ray import serve

    paths = _models(tmp_path / "store")
    refs = {}
    for name, path in paths.items():
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        refs[name] = greedy_tokens(ref_model, PROMPT, 64)
    catalog = Catalog.from_dict({"models": {n: {"path": p} for n, p in paths.items()}})
    profile = _profile(tmp_path / "profile.json")
    ssd = {k: tmp_path / k / "ssd" for k in ("node0", "node1")}
    for node, model in (("node1", "llama"), ("node0", "qwen")):  # each holder known in advance
        with fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=str(ssd[node])) as loader:
            assert loader.prefetch(paths[model], tier="ssd").result(timeout=120)
    nodes = [
        NodeSpec(
            k,
            1,
            {"fastckpt_replica": 1, k: 1},
            {
                "FASTCKPT_DRAM_TIER_BYTES": str(64 << 20),
                "FASTCKPT_SSD_TIER_BYTES": str(1 << 30),
                "FASTCKPT_SSD_TIER_DIR": str(ssd[k]),
                "FASTCKPT_SCHED_PROFILE": profile,
            },
        )
        for k in ("node0", "node1")
    ]
    with LocalCluster(nodes, start_timeout_s=240) as cluster:
        cluster.connect(log_to_driver=False)
        serve.start(proxy_location="Disabled")
        app = build_app(
            catalog,
            num_replicas=2,
            max_models_per_replica=1,
            max_ongoing_requests=1,
            stats_period_s=PERIOD_S,
            ray_actor_options={"num_cpus": 0, "resources": {"fastckpt_replica": 1}},
            max_replicas_per_node=1,
        )
        handle = serve.run(app, name="acceptance")
        from fastckpt.sched.wire import DECISIONS, VIEWS

        # The replicas' first reports: each node's SSD tier copy is known to the router.
        deadline = time.monotonic() + 60
        while len(VIEWS) < 2 and time.monotonic() < deadline:
            for _ in handle.options(stream=True).ping.remote():  # routing starts the router
                break
            time.sleep(0.2)
        holder: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(holder) < 2 and time.monotonic() < deadline:
            for name, view in list(VIEWS.items()):
                for model in view["holds"].get("ssd", []):
                    holder[model] = name
            time.sleep(0.1)
        assert set(holder) == {"llama", "qwen"} and holder["llama"] != holder["qwen"], VIEWS
        node_of = {v: k for k, v in _node_ids().items()}

        async def scenario() -> None:
            # 1. Each first request goes where the model's SSD copy is.
            for model, node in (("llama", "node1"), ("qwen", "node0")):
                t_sent = time.time()
                header, got = await _ask(handle, model, 8)
                t_done = time.time()
                assert got == refs[model][:8], (model, got)
                assert header["replica"] == holder[model] and node_of[header["node"]] == node
                assert header["waited"] and header["tier"] == "ssd", header
                assert DECISIONS[-1]["chosen"] == holder[model]
                view = _wait_view(holder[model], lambda v, m=model: m in v["resident"], t_sent, 30)
                lag = view["received"] - t_done
                assert lag <= PERIOD_S * 1.1 + PROPAGATION_S, (model, lag, view)
            # 2. The qwen replica is busy with a long request: the next qwen request starts qwen
            #    on the other node, which evicts llama there (llama stays in its DRAM tier).
            busy = asyncio.ensure_future(_ask(handle, "qwen", 3000))
            await asyncio.sleep(0.5)
            t_sent = time.time()
            header, got = await _ask(handle, "qwen", 8)
            t_done = time.time()
            assert got == refs["qwen"][:8]
            assert header["replica"] == holder["llama"] and header["waited"], header
            assert header["tier"] == "remote", header  # node1's tiers did not hold qwen
            view = _wait_view(
                holder["llama"],
                lambda v: v["resident"] == ["qwen"] and "llama" in v["holds"].get("dram", []),
                t_sent,
                30,
            )
            assert view["received"] - t_done <= PERIOD_S * 1.1 + PROPAGATION_S, view
            first, long_tokens = await busy
            assert long_tokens[:64] == refs["qwen"] and len(long_tokens) == 3000
            assert first["replica"] == holder["qwen"]
            # 3. llama, resident nowhere now, goes to the node whose DRAM tier holds it.
            header, got = await _ask(handle, "llama", 8)
            assert got == refs["llama"][:8]
            assert header["replica"] == holder["llama"] and header["tier"] == "dram", header

        asyncio.run(asyncio.wait_for(scenario(), 300))
        print(json.dumps(list(DECISIONS)[-3:], default=str)[:2000])
    assert cluster.nodes == []  # every node's process group is gone
