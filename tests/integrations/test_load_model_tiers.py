"""load_model reads the index once and hands it to the load; the load must still go through the
Loader's SSD tier and the node's cache daemon as a load by path does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import fastckpt
from fastckpt.serve.spawn import start_daemon, stop_daemon


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_model_keeps_a_converted_copy_in_the_ssd_tier(tiny_factory, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny = tiny_factory("llama")
    ref = AutoModelForCausalLM.from_pretrained(tiny.src)
    with fastckpt.Loader(ssd_tier_bytes=1 << 30, ssd_tier_dir=str(tmp_path / "ssd")) as loader:
        with loader.use():
            first = fastckpt.load_model(tiny.src)
        assert loader.conversions.wait(60)
        ssd = loader.cache_info()["ssd"]
        assert len(ssd["keys"]) == 1 and ssd["misses"] == 1  # converted after the first load
        assert ssd["conversions"]["done"] == 1
        with loader.use():
            second = fastckpt.load_model(tiny.src)
        again = loader.cache_info()["ssd"]
        assert (again["misses"], again["hits"]) == (1, ssd["hits"] + 1)  # the copy, reused
        assert again["conversions"]["scheduled"] == 1
    _same_weights(first, ref)
    _same_weights(second, ref)


def test_load_model_is_served_by_the_cache_daemon(tiny_factory, tmp_path: Path) -> None:
    tiny = tiny_factory("llama")
    sock = str(tmp_path / "sock")
    root = os.path.dirname(tiny.fck)
    proc = start_daemon(sock, root, "64MiB")
    try:
        from fastckpt.serve.client import Client

        with fastckpt.Loader(server=sock) as loader, loader.use():
            model = fastckpt.load_model(tiny.fck)
        with Client(sock, timeout_s=10) as client:
            entries = client.ls()["entries"]
            served = client.stats()
        assert [e["name"] for e in entries] == [os.path.basename(tiny.fck)]
        assert served["misses"] == 1, served  # the load asked the daemon, which filled it
        _same_weights(model, fastckpt.load_model(tiny.fck))
    finally:
        stop_daemon(proc)
