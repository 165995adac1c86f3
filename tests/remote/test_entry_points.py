"""Every entry point on s3:// and http:// checkpoints: ``fastckpt convert`` (API and CLI),
``Loader.prefetch(tier="ssd")`` and the second start from the SSD tier (no data fetched, the
identity checked), ``fastckpt cache ls``, single flight across threads and processes,
``load_model`` and the transformers drop-in, the vLLM plug-in's weight source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastckpt
from fastckpt.errors import CacheWarning

from .conftest import Checkpoints, Http, Remote, assert_same


def _tier(path: Path, **kw: object) -> fastckpt.Loader:
    return fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=str(path), **kw)


def _data_gets(remote_log: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(path, range) of the ranged GETs of weights (partitions and safetensors files)."""
    return [
        (p, r)
        for m, p, r in remote_log
        if m == "GET" and r and (".fckpt" in p or ".safetensors" in p) and "index" not in p
    ]


# ------------------------------------------------------------------------------ convert


def test_convert_api_and_cli_from_s3_and_http(
    remote: Remote, http: Http, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    from fastckpt.cli import main

    url = remote.upload(checkpoints.st_dir)
    fastckpt.convert(url, tmp_path / "a.fastckpt")
    assert_same(fastckpt.load(tmp_path / "a.fastckpt"), checkpoints.state)
    assert (tmp_path / "a.fastckpt" / "config.json").read_text() == '{"note": "carried"}'
    assert main(["convert", http.url("one.safetensors"), str(tmp_path / "b.fastckpt")]) == 0
    assert_same(fastckpt.load(tmp_path / "b.fastckpt"), checkpoints.state)
    # the temporary download beside the destination is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fastckpt", "b.fastckpt"]


# ------------------------------------------------------------------------------ the SSD tier


@pytest.mark.parametrize("kind", ["fck", "st_dir"])
def test_write_through_then_a_second_start_reads_the_ssd_tier(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path, kind: str
) -> None:
    url = remote.upload(getattr(checkpoints, kind))
    with _tier(tmp_path / "ssd") as ld:
        got, stats = ld.load(url, "cpu", stats=True)
        assert_same(got, checkpoints.state)
        assert stats.path_taken.startswith("stream")
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True  # written through
    remote.proxy.clear()
    with _tier(tmp_path / "ssd") as ld:  # a second start: a new Loader on the same directory
        got, stats = ld.load(url, "cpu", stats=True)
        assert_same(got, checkpoints.state)
        assert not stats.path_taken.startswith("stream")
    assert _data_gets(remote.proxy.log) == []  # only the identity was asked for
    assert remote.proxy.requests >= 1


def test_prefetch_to_ssd_and_cache_ls_show_where_it_came_from(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path, capsys
) -> None:
    from fastckpt.cli import main

    url = remote.upload(checkpoints.fck)
    with _tier(tmp_path / "ssd") as ld:
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
    capsys.readouterr()
    assert main(["cache", "ls", "--dir", str(tmp_path / "ssd")]) == 0
    assert url in capsys.readouterr().out


def test_within_remote_fresh_s_the_store_is_not_asked(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.st_file)
    with _tier(tmp_path / "ssd") as ld:
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
    remote.proxy.clear()
    with _tier(tmp_path / "ssd", remote_fresh_s=3600) as ld:
        assert_same(ld.load(url, "cpu"), checkpoints.state)
    assert remote.proxy.requests == 0


def test_a_stale_entry_is_revalidated_and_an_unreachable_store_serves_it_with_a_warning(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path, monkeypatch
) -> None:
    url = remote.upload(checkpoints.st_file)
    with _tier(tmp_path / "ssd") as ld:
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
    remote.s3.upload_tree(str(checkpoints.st_file2), url.split("/", 3)[3])  # a new generation
    with _tier(tmp_path / "ssd") as ld:
        assert_same(ld.load(url, "cpu"), checkpoints.state2)  # the store said: changed
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
    # the store goes away: the entry is served, said with a warning
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRIES", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _tier(tmp_path / "ssd") as ld:
            assert_same(ld.load(url, "cpu"), checkpoints.state2)
    assert any(
        issubclass(w.category, CacheWarning) and "could not be reached" in str(w.message)
        for w in caught
    )


# ------------------------------------------------------------------------------ single flight


def test_threads_loading_one_url_at_once_download_it_once(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.fck)
    results: list[dict] = []
    errors: list[BaseException] = []
    with _tier(tmp_path / "ssd") as ld:
        start = threading.Barrier(4)

        def one() -> None:
            try:
                start.wait(timeout=30)
                results.append(ld.load(url, "cpu"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and len(results) == 4
    for got in results:
        assert_same(got, checkpoints.state)
    gets = _data_gets(remote.proxy.log)
    assert len(gets) == len(set(gets))  # no range fetched twice


_WORKER = textwrap.dedent(
    """
    import sys, fastckpt
    with fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=sys.argv[2]) as ld:
        sd = ld.load(sys.argv[1], "cpu")
        import torch
        print(sum(int(t.reshape(-1).view(torch.uint8).sum()) for t in sd.values()))
    """
)


def test_processes_sharing_the_tier_download_once(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.fck)
    ssd = tmp_path / "ssd"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(ssd)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(set(outs)) == 1
    gets = _data_gets(remote.proxy.log)
    assert gets and len(gets) == len(set(gets))  # one process downloaded, the others waited


# ------------------------------------------------------------------------------ integrations


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    import torch

    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg)
    root = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(root / "st", safe_serialization=True)
    fastckpt.convert(root / "st", root / "fck")
    yield root


def _same_params(a, b) -> None:
    import torch

    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize("form", ["st", "fck"])
def test_load_model_and_the_transformers_drop_in_on_s3(
    remote: Remote, tiny_model: Path, form: str
) -> None:
    import transformers

    from fastckpt.integrations.transformers import switch

    want = transformers.LlamaForCausalLM.from_pretrained(tiny_model / "st")
    url = remote.upload(tiny_model / form, f"llama-{form}")
    _same_params(fastckpt.load_model(url), want)
    switch.enable()
    try:
        got = transformers.AutoModelForCausalLM.from_pretrained(url)
    finally:
        switch.disable()
    _same_params(got, want)


def test_load_model_over_http(http: Http, tiny_model: Path) -> None:
    import transformers

    from fastckpt.bench.localstore import RangeServer

    want = transformers.LlamaForCausalLM.from_pretrained(tiny_model / "st")
    with RangeServer(str(tiny_model)) as server:
        got = fastckpt.load_model(f"{server.url}/fck")
    _same_params(got, want)


def test_the_vllm_weight_source_streams_a_url(remote: Remote, checkpoints: Checkpoints) -> None:
    from fastckpt.integrations.vllm.options import parse_options
    from fastckpt.integrations.vllm.weights import iter_weights

    url = remote.upload(checkpoints.fck)
    options = parse_options({"checkpoint": url})
    assert options.checkpoint == url
    assert_same(dict(iter_weights(url, options)), checkpoints.state)


def test_an_ssd_entry_records_its_objects(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.st_file)
    with _tier(tmp_path / "ssd") as ld:
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
    (entry,) = [p for p in (tmp_path / "ssd").iterdir() if not p.name.startswith(".")]
    meta = json.loads(next(p for p in entry.iterdir() if p.suffix == ".json").read_text())
    assert meta["source"] == url
    (ident,) = meta["remote"]["objects"].values()
    assert ident[2] == os.path.getsize(checkpoints.st_file) and ident[3]  # size and ETag


def test_the_remote_benchmark_runs_every_method_at_a_tiny_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fastckpt bench --scenario remote`` smoke run: its server context and each method, in
    this process (the harness runs them in fresh ones)."""
    import argparse

    from fastckpt.bench import harness, scenario_remote

    args = argparse.Namespace(scenario="remote")
    ctx = harness.Context("remote", args, str(tmp_path), 300_000, "cpu", ("-",))
    plan = scenario_remote.plan(ctx)
    with scenario_remote.context(ctx):
        for k, v in ctx.shared["env"].items():
            monkeypatch.setenv(k, v)
        for m in plan:
            got = scenario_remote.measure({**m.spec, "device": "cpu"})
            assert got["nbytes"] >= 300_000 - 64, (m.method, got)
            assert got["extra"]["first_tensor_s"] >= 0 and got["extra"]["cpu_s"] >= 0
            if m.method == "fastckpt s3 + write-through":
                assert got["extra"]["kept"] is True
            if m.method == "fastckpt ssd second start":
                assert not got["extra"]["path_taken"].startswith("stream")


def test_remote_endpoint_setting_overrides_the_aws_environment(
    remote: Remote, checkpoints: Checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = remote.upload(checkpoints.st_file)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with fastckpt.Loader(remote_endpoint=remote.proxy.url, remote_retries=0) as ld:
        assert_same(ld.load(url, "cpu"), checkpoints.state)
    assert remote.proxy.requests > 0


def test_evict_removes_the_ssd_entries_of_a_url(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.st_file)
    with _tier(tmp_path / "ssd") as ld:
        assert ld.prefetch(url, tier="ssd").result(timeout=60) is True
        assert ld.ssd_tier is not None and len(ld.ssd_tier.entries_from(url)) == 1
        assert ld.evict(url) >= 1
        assert ld.ssd_tier.entries_from(url) == []


def test_a_version_id_pins_the_generation_loaded(
    remote: Remote, checkpoints: Checkpoints, loader_plain: fastckpt.Loader
) -> None:
    url = remote.upload(checkpoints.st_file)
    bucket, key = url[len("s3://") :].split("/", 1)
    client = remote.s3.client()
    first = client.head_object(Bucket=bucket, Key=key)["VersionId"]
    remote.s3.upload_tree(str(checkpoints.st_file2), key)  # a newer version on top
    assert_same(loader_plain.load(url, "cpu"), checkpoints.state2)
    assert_same(loader_plain.load(f"{url}?versionId={first}", "cpu"), checkpoints.state)


@pytest.fixture
def loader_plain() -> Iterator[fastckpt.Loader]:
    with fastckpt.Loader() as ld:
        yield ld
