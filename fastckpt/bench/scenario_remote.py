"""Scenario ``remote``: a checkpoint in an S3-compatible store (moto's S3 server on 127.0.0.1,
started by ``context``), read by fresh processes, all on the same object (one stock
``.safetensors`` file of ``--size``):

- ``fastckpt s3``: ``fastckpt.load("s3://...")`` with no SSD tier (streamed into memory);
- ``fastckpt s3 iter_tensors``: the same through ``fastckpt.iter_tensors`` (time to first tensor);
- ``fastckpt s3 + write-through``: a first start with an empty SSD tier: the load, then the
  wait until the tier's copy is published (``extra.publish_s``; ``seconds`` is the load);
- ``fastckpt ssd second start``: a second start from that SSD tier (its files dropped from the
  page cache first: local-disk speed), the store asked only whether the object changed;
- ``fastckpt local file``: ``fastckpt.load`` of the same file on local disk, cold (the
  local-disk reference);
- ``runai streamer``: Run:ai's ``SafetensorsStreamer`` (``runai-model-streamer[s3]``), each
  tensor cloned as it is yielded (its buffers are reused), when it is installed;
- ``fastckpt http`` / ``http download + load_file``: the same file from an HTTP server with
  ranges on 127.0.0.1 (``RangeServer``: ``sendfile``), which, unlike moto, does not copy the
  whole object for each ranged GET (moto reads an object's whole value, under a lock, to answer
  any range of it: ranged readers pay that once per range there);
- ``boto3 download + load_file``: ``download_file`` into a local file, then
  ``safetensors.torch.load_file`` (the baseline: download, then load);
- ``client boto3 ranges`` / ``client obstore ranges`` (S3), ``client urllib3 ranges http`` /
  ``client obstore ranges http``: the client libraries alone on the same object, the same
  ranges (``remote_range_bytes``) and concurrency (``remote_concurrency``; 10, obstore's own
  limit), into memory: seconds and CPU seconds (``extra.cpu_s``). urllib3 is boto3's data path
  and fastckpt's HTTP client. This is what chose boto3 (docs/remote.md).

Done means usable: every CPU tensor's pages touched. ``extra.first_tensor_s`` is the time to the
first usable tensor (the whole load for loaders that return everything at once).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from fastckpt.bench.harness import Context, Measurement, Skipped

HELP = "fastckpt from a local S3 server (streamed, written through, second start from the SSD "
HELP += "tier) beside Run:ai's streamer and download-then-load_file"
BASELINES = {"remote": "boto3 download + load_file"}
KEY = "bench/model.safetensors"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """No options of its own: ``--size``, ``--repeats``, ``--workdir``."""


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(ctx: Context) -> list[Measurement]:
    if not (_installed("boto3") and _installed("moto")):
        raise Skipped("needs boto3 and moto[server]: pip install '.[test]' in the clone")
    local = _safetensors_file(ctx)
    ssd = os.path.join(ctx.workdir, "ssd-second-start")
    ctx.shared.update(local=local, ssd=ssd)
    methods = [
        "fastckpt s3",
        "fastckpt s3 iter_tensors",
        "fastckpt s3 + write-through",
        "fastckpt ssd second start",
        "fastckpt local file",
        "boto3 download + load_file",
        "client boto3 ranges",
        "fastckpt http",
        "http download + load_file",
        "client urllib3 ranges http",
    ]
    if _installed("runai_model_streamer"):
        methods.append("runai streamer")
    if _installed("obstore"):
        methods += ["client obstore ranges", "client obstore ranges http"]
    # the store's address and test credentials: filled in by ``context`` (the server's port)
    env = ctx.shared.setdefault("env", {"AWS_EC2_METADATA_DISABLED": "true"})
    return [
        Measurement(
            method,
            {
                "method": method,
                "url": f"s3://models/{KEY}",
                "http": os.path.join(ctx.workdir, "http-url"),  # holds the server's URL
                "local": local,
                "ssd": ssd,
            },
            files=[local] if method == "fastckpt local file" else [],
            state="cold" if method == "fastckpt local file" else "-",
            env=env,
        )
        for method in methods
    ]


def _safetensors_file(ctx: Context) -> str:
    """A stock safetensors file of about ``--size`` bytes (bf16 tensors of up to 64 MiB)."""
    path = os.path.join(ctx.workdir, "model.safetensors")
    if os.path.exists(path):
        return path
    import torch
    from safetensors.torch import save_file

    from fastckpt.rules.units import MiB

    g = torch.Generator().manual_seed(23)
    state, left, i = {}, max(4096, ctx.size_bytes), 0
    while left > 0:
        n = min(left, 64 * MiB) // 2
        state[f"layers.{i}.weight"] = torch.randn(max(n, 1), generator=g).to(torch.bfloat16)
        left -= 2 * max(n, 1)
        i += 1
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


@contextlib.contextmanager
def context(ctx: Context) -> Iterator[None]:
    """moto's S3 server holding the object; the SSD tier for second starts filled once."""
    from fastckpt.bench.localstore import RangeServer, s3_server

    with s3_server("models") as s3, RangeServer(os.path.dirname(ctx.shared["local"])) as web:
        with open(os.path.join(ctx.workdir, "http-url"), "w", encoding="utf-8") as f:
            f.write(f"{web.url}/{os.path.basename(ctx.shared['local'])}")
        s3.upload_tree(ctx.shared["local"], KEY)
        env = ctx.shared["env"]
        env.update(
            s3.env,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
        )
        with _environ(env):
            import fastckpt

            with fastckpt.Loader(ssd_tier_bytes=1 << 50, ssd_tier_dir=ctx.shared["ssd"]) as ld:
                if not ld.prefetch(f"s3://models/{KEY}", tier="ssd").result():
                    raise RuntimeError("the SSD tier could not keep the checkpoint")
        try:
            yield
        finally:
            shutil.rmtree(ctx.shared["ssd"], ignore_errors=True)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def describe(ctx: Context) -> dict[str, Any]:
    from fastckpt.config import get_config

    cfg = get_config()
    return {
        "object": f"s3://models/{KEY} (moto's ThreadedMotoServer on 127.0.0.1)",
        "bytes": os.path.getsize(ctx.shared["local"]) if "local" in ctx.shared else None,
        "remote_concurrency": cfg.remote_concurrency,
        "remote_range_bytes": cfg.remote_range_bytes,
    }


# ------------------------------------------------------------------------------------ measuring


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from fastckpt.bench.worker import touch_pages

    method, url = spec["method"], spec["url"]
    extra: dict[str, Any] = {}
    _imports(method)  # every method's libraries are imported before the clock starts
    t0 = time.perf_counter()
    c0 = _cpu_s()
    first: float | None = None
    if method.startswith(("fastckpt http", "http ")) or method.endswith(" http"):
        with open(spec["http"], encoding="utf-8") as f:
            url = f.read().strip()
    if method.startswith("client "):
        nbytes = _client_ranges(method.split()[1], url)
    elif method == "fastckpt s3 iter_tensors":
        import fastckpt

        nbytes = 0
        for _, t in fastckpt.iter_tensors(url, "cpu"):
            touch_pages({"t": t})
            first = time.perf_counter() - t0 if first is None else first
            nbytes += t.numel() * t.element_size()
    elif method == "runai streamer":
        from runai_model_streamer import SafetensorsStreamer

        nbytes = 0
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(url)
            for _, t in streamer.get_tensors():
                t = t.clone()
                first = time.perf_counter() - t0 if first is None else first
                nbytes += t.numel() * t.element_size()
    elif method.endswith("download + load_file"):
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(dir=os.path.dirname(spec["local"])) as tmp:
            dst = os.path.join(tmp, "model.safetensors")
            _download(method.split()[0], url, dst)
            extra["download_s"] = time.perf_counter() - t0
            state = load_file(dst)
            touch_pages(state)
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
    else:
        nbytes = _fastckpt(method, {**spec, "url": url}, extra, t0)
    seconds = time.perf_counter() - t0
    extra["first_tensor_s"] = first if first is not None else seconds
    extra["cpu_s"] = _cpu_s() - c0
    return {"seconds": extra.pop("load_s", seconds), "nbytes": nbytes, "extra": extra}


def _imports(method: str) -> None:
    """Import what ``method`` uses (imports are not a load's cost, and differ between them)."""
    import importlib

    names = ["fastckpt.loader.api", "fastckpt.loader.session", "fastckpt.remote.store"]
    if "boto3" in method or "s3" in method:
        names += ["boto3", "botocore.config"]
    if "load_file" in method:
        names.append("safetensors.torch")
    if "runai" in method:
        names.append("runai_model_streamer")
    if "obstore" in method:
        names += ["obstore", "obstore.store"]
    for name in names:
        importlib.import_module(name)


def _fastckpt(method: str, spec: dict[str, Any], extra: dict[str, Any], t0: float) -> int:
    import fastckpt
    from fastckpt.bench.common import drop_from_page_cache
    from fastckpt.bench.worker import touch_pages

    url = spec["url"]
    if method == "fastckpt local file":
        state = fastckpt.load(spec["local"], "cpu")
    elif method in ("fastckpt s3", "fastckpt http"):
        state = fastckpt.load(url, "cpu")
    else:
        fresh = method == "fastckpt s3 + write-through"
        ssd = tempfile.mkdtemp(dir=os.path.dirname(spec["ssd"])) if fresh else spec["ssd"]
        if not fresh:
            drop_from_page_cache(os.path.join(d, n) for d, _, names in os.walk(ssd) for n in names)
            t0 = time.perf_counter()  # the page cache drop is not the load's cost
        try:
            with fastckpt.Loader(ssd_tier_bytes=1 << 50, ssd_tier_dir=ssd) as ld:
                state, stats = ld.load(url, "cpu", stats=True)
                touch_pages(state)
                extra["load_s"] = time.perf_counter() - t0
                extra["path_taken"] = stats.path_taken
                if fresh:
                    kept = ld.prefetch(url, tier="ssd").result()
                    extra["publish_s"] = time.perf_counter() - t0 - extra["load_s"]
                    extra["kept"] = kept
        finally:
            if fresh:
                shutil.rmtree(ssd, ignore_errors=True)
    touch_pages(state)
    return sum(t.numel() * t.element_size() for t in state.values())


def _download(client: str, url: str, dst: str) -> None:
    if client == "http":
        import shutil as _shutil

        import urllib3

        resp = urllib3.PoolManager().request("GET", url, preload_content=False)
        try:
            with open(dst, "wb") as f:
                _shutil.copyfileobj(resp, f, 16 << 20)
        finally:
            resp.release_conn()
        return
    bucket, key = url[len("s3://") :].split("/", 1)
    import boto3

    boto3.client("s3").download_file(bucket, key, dst)


def _obstore(bucket: str) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=os.environ["AWS_ENDPOINT_URL"],
        region=os.environ.get("AWS_REGION", "us-east-1"),
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def _client_ranges(client: str, url: str) -> int:
    """The object's bytes by parallel ranged GETs of ``remote_range_bytes``, into memory: the
    same requests from each client (obstore's coalescing of adjacent ranges is off)."""
    from fastckpt.config import get_config

    cfg = get_config()
    http = not url.startswith("s3://")
    if client == "obstore":
        import obstore
        from obstore.store import HTTPStore

        if http:
            base, key = url.rsplit("/", 1)
            store: Any = HTTPStore.from_url(base, client_options={"allow_http": True})
        else:
            bucket, key = url[len("s3://") :].split("/", 1)
            store = _obstore(bucket)
        size = obstore.head(store, key)["size"]
        starts = list(range(0, size, cfg.remote_range_bytes))
        ends = [min(size, s + cfg.remote_range_bytes) for s in starts]
        got = obstore.get_ranges(store, key, starts=starts, ends=ends, coalesce=0)
        return sum(len(b) for b in got)
    from concurrent.futures import ThreadPoolExecutor

    from fastckpt.remote.store import HttpStore, S3Store, Store

    if http:
        base, key = url.rsplit("/", 1)
        raw: Store = HttpStore(base, cfg)
    else:
        bucket, key = url[len("s3://") :].split("/", 1)
        raw = S3Store(bucket, cfg)
    info = raw.head(key, key)
    buf = memoryview(bytearray(info.size))

    def one(lo: int) -> int:
        hi = min(info.size, lo + cfg.remote_range_bytes)
        body = raw.get(info, lo, hi)
        try:
            at = lo
            while at < hi:
                n = body.readinto(buf[at:hi])
                if n <= 0:
                    raise OSError(f"short body at {at}")
                at += n
        finally:
            body.close()
        return hi - lo

    with ThreadPoolExecutor(cfg.remote_concurrency) as pool:
        return sum(pool.map(one, range(0, info.size, cfg.remote_range_bytes)))
