"""The serving deployment's parts that need no Ray cluster: the catalog, a replica's state and
its routing stats, the Loader tier view on a real Loader (the eviction hook:
test_ray_serve_runners.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import fastckpt
from fastckpt.integrations.ray_serve.catalog import Catalog, CatalogError
from fastckpt.integrations.ray_serve.state import HostState, LoaderTiers, NoTiers
from fastckpt.loader.ssdconvert import convert_opened
from fastckpt.sched import Estimator, ModelSpec
from fastckpt.sched.profile import MachineProfile, TierProfile
from fastckpt.sched.wire import server_from_dict


def test_package_imports_neither_torch_ray_nor_vllm() -> None:
    # the package, a replica's state and the runners (vLLM's included) import them lazily
    mods = ("", ".state", ".runners", ".vllm_runner")
    code = (
        "import sys\n"
        + "".join(f"import fastckpt.integrations.ray_serve{m}\n" for m in mods)
        + "print(','.join(m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_catalog_reads_toml_and_json_and_sizes_from_the_index(tiny_factory, tmp_path) -> None:
    tiny = tiny_factory("llama")
    toml = tmp_path / "models.toml"
    toml.write_text(
        f'[models.a]\npath = "{tiny.src}"\n\n[models.b]\npath = "{tiny.fck}"\nnbytes = 7\n'
    )
    cat = Catalog.load(toml)
    assert list(cat) == ["a", "b"] and cat["b"].nbytes == 7
    assert cat["a"].nbytes == sum(p.stat().st_size for p in Path(tiny.src).glob("*.safetensors"))
    js = tmp_path / "models.json"
    js.write_text(json.dumps(cat.as_dict()))
    assert dict(Catalog.load(js)) == dict(cat)
    assert Catalog.load(js).by_path()[str(Path(tiny.src).resolve())] == "a"
    with pytest.raises(KeyError, match="not in the catalog"):
        cat["zz"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "no \\[models.NAME\\]"),
        ({"models": {"a": {"path": "/x", "nbytes": 1}}, "extra": 1}, "unknown top-level"),
        ({"models": {"a b": {"path": "/x", "nbytes": 1}}}, "model name"),
        ({"models": {"a": {"nbytes": 1}}}, "'path' must be"),
        ({"models": {"a": {"path": "/x", "nbytes": 1, "gpu": 1}}}, "unknown keys"),
        ({"models": {"a": {"path": "/x", "nbytes": 0}}}, "positive integer"),
        ({"models": {"a": {"path": "/does/not/exist"}}}, "cannot read the checkpoint"),
    ],
)
def test_catalog_errors_name_the_entry(data, match) -> None:
    with pytest.raises(CatalogError, match=match):
        Catalog.from_dict(data)


def test_catalog_file_errors(tmp_path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[models\n")
    with pytest.raises(CatalogError, match="not valid TOML"):
        Catalog.load(bad)
    with pytest.raises(CatalogError, match=r"\.toml or \.json"):
        Catalog.load(tmp_path / "c.yaml")
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path / "missing.json")


class Clock:
    def __init__(self) -> None:
        self.t = 10.0

    def __call__(self) -> float:
        return self.t


class FakeView:
    kind = "fake"

    def __init__(self) -> None:
        self.dram: dict[str, int] = {}
        self.ssd: dict[str, int] = {}
        self.refreshed = 0

    def held(self) -> dict[str, dict[str, int]]:
        return {"dram": dict(self.dram), "ssd": dict(self.ssd)}

    def refresh(self) -> None:
        self.refreshed += 1


CAT = Catalog.from_dict(
    {"models": {"a": {"path": "/m/a", "nbytes": 4000}, "b": {"path": "/m/b", "nbytes": 2000}}}
)
PROFILE = MachineProfile(
    "cpu",
    {
        "dram": TierProfile("dram", 1e6, 0.1, 1e6),
        "disk": TierProfile("disk", 1e3, 0.5, 1e3),
        "remote": TierProfile("remote", 1e2, 1.0, 1e2),
    },
)


def test_state_follows_a_start_and_reports_it_as_routing_stats() -> None:
    clock, view = Clock(), FakeView()
    st = HostState("r1", CAT, view, 2, profile=PROFILE, clock=clock, wall=lambda: 5.0,
                   free_memory=lambda: 123)  # fmt: skip
    assert st.uncalibrated == [] and st.speeds["ssd"].bandwidth_bps == 1e3  # ssd <- disk
    view.ssd["a"] = 4000
    assert st.request("a") is True  # not resident: waits for a start
    rep = st.report()
    assert rep["queued"] == [{"model": "a", "tier": "ssd", "nbytes": 4000}]
    assert rep["queues"] == {"ssd": {"loads": 1, "nbytes": 4000}}
    assert st.start("a") == "ssd"
    clock.t += 2.5  # 0.5 s overhead, then 2 s at 1000 B/s: 2000 bytes left
    rep = st.report()
    assert rep["loading"][0]["nbytes_left"] == 2000 and rep["queued"] == []
    server = server_from_dict("r1", rep)
    assert server.serial and server.queue("ssd").nbytes == 2000
    # b, in no tier, waits for a's load (serial: 2000 B at the ssd speed) then comes from remote
    est = Estimator().estimate(server, ModelSpec("b", 2000, gpus=0))
    assert est.load is not None and est.load.tier == "remote"
    assert est.load.queue_wait_s == pytest.approx(1 * 0.5 + 2000 / 1e3)
    clock.t += 1.0
    view.dram["a"] = 4000
    seconds, seq = st.finish("a", ok=True)
    assert seconds == pytest.approx(3.5) and seq == 1 and view.refreshed == 1
    assert st.request("a") is False
    rep = st.report()
    assert rep["resident"] == ["a"] and rep["loads"]["ssd"] == 1 and rep["holds"]["dram"] == ["a"]
    assert (rep["gpus"], rep["free_gpus"]) == (2, 1)  # one of two slots holds a
    assert rep["free_memory_bytes"] == 123 and rep["at"] == 5.0 and rep["waited"] == 1
    assert st.speeds["ssd"].observations == 1  # refined by the timed load
    st.evicted("a")
    st.evicted("a")  # counted once
    rep = st.report()
    assert rep["resident"] == [] and rep["evictions"] == 1 and rep["holds"]["dram"] == ["a"]


def test_failed_and_abandoned_starts_leave_no_trace() -> None:
    st = HostState("r1", CAT, NoTiers(), 1, clock=Clock())
    assert st.uncalibrated == ["dram", "ssd", "remote"] or st.uncalibrated  # nominal speeds
    st.request("a")
    st.abandon("a")
    assert st.report()["queued"] == []
    st.request("b")
    assert st.start("b") == "remote"
    st.finish("b", ok=False)
    rep = st.report()
    assert rep["resident"] == [] and rep["failed_loads"] == 1 and rep["queues"] == {}
    with pytest.raises(ValueError):
        HostState("r", CAT, NoTiers(), 0)


def test_loader_view_maps_tier_items_to_model_names(tiny_factory, tmp_path) -> None:
    tiny = tiny_factory("llama")
    cat = Catalog.from_dict({"models": {"src": {"path": tiny.src}, "fck": {"path": tiny.fck}}})
    go = threading.Event()

    def held_back(loader: Any, opened: Any, dst: str) -> Any:
        assert go.wait(60)
        return convert_opened(loader, opened, dst)

    with fastckpt.Loader(dram_tier_bytes=64 << 20, ssd_tier_bytes=64 << 20,
                         ssd_tier_dir=str(tmp_path / "ssd"),
                         ssd_converter=held_back) as loader:  # fmt: skip
        view = LoaderTiers(loader, cat)
        assert view.held() == {"dram": {}, "ssd": {}}
        with loader.use():
            fastckpt.load_model(tiny.src)  # held in DRAM; converted into the SSD tier after
            fastckpt.load_model(tiny.fck)  # a fastckpt checkpoint: held in DRAM as it is
        view.refresh()
        held = view.held()
        # the copy is being made: not reported on SSD until it is complete
        assert set(held["dram"]) == {"src", "fck"} and held["ssd"] == {}
        assert loader.cache_info()["ssd"]["conversions"]["converting"]
        go.set()
        assert loader.conversions.wait(60)
        held = view.held()  # no refresh needed: a new copy is looked up by itself
        assert set(held["dram"]) == {"src", "fck"} and set(held["ssd"]) == {"src"}
        loader.evict(tiny.src)
        assert set(view.held()["dram"]) == {"fck"} and view.held()["ssd"] == {}


def test_daemon_view_follows_the_daemons_listing(tiny_factory, tmp_path) -> None:
    import os

    from fastckpt.integrations.ray_serve.state import DaemonTiers
    from fastckpt.serve.client import Client
    from fastckpt.serve.spawn import start_daemon, stop_daemon

    tiny = tiny_factory("llama")
    cat = Catalog.from_dict({"models": {"fck": {"path": tiny.fck}}})
    sock = str(tmp_path / "sock")
    view = DaemonTiers(sock, cat)
    assert view.held() == {"dram": {}} and "Error" in view.error  # no daemon yet: nothing held
    proc = start_daemon(sock, os.path.dirname(tiny.fck), "64MiB")
    try:
        assert view.held() == {"dram": {}} and view.error == ""
        with fastckpt.Loader(server=sock) as loader, loader.use():
            fastckpt.load_model(tiny.fck)  # the daemon fills its copy
        held = view.held()
        assert list(held["dram"]) == ["fck"] and held["dram"]["fck"] == cat["fck"].nbytes
        st = HostState("r", cat, view, 1)
        assert st.report()["holds"] == {"dram": ["fck"]} and st.tier_of("fck") == "dram"
        with Client(sock, timeout_s=10) as client:
            client.evict(tiny.fck)
        assert view.held() == {"dram": {}}
    finally:
        stop_daemon(proc)
