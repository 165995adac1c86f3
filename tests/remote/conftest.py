"""Real servers on 127.0.0.1 for the remote tier's tests: moto's S3 server (one per session),
the ranged HTTP file server (one per module), a fault-injecting proxy in front of either (one
per test), all started and stopped here. Checkpoints are tiny (a few hundred KiB) and made once:
a fastckpt checkpoint with several partitions and 64 KiB checksum chunks, and a sharded stock
safetensors folder with its index json and a config.json."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("boto3")
pytest.importorskip("moto")

import fastckpt  # noqa: E402
from fastckpt.bench.localstore import RangeServer, S3Server, s3_server  # noqa: E402

from .faultproxy import FaultProxy  # noqa: E402

CHUNK = 64 << 10
_counter = itertools.count()


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    state: dict[str, torch.Tensor]
    fck: Path  # fastckpt directory
    st_dir: Path  # sharded safetensors folder (index json, config.json)
    st_file: Path  # one .safetensors file
    state2: dict[str, torch.Tensor]  # a second generation: same names, shapes and layout
    fck2: Path
    st_file2: Path


def _state(seed: int = 23) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layers.{i}.weight": torch.randn(64, 100 + i, generator=g) for i in range(12)}
    out["embed.weight"] = torch.randn(96, 32, generator=g).to(torch.bfloat16)
    out["mask"] = torch.rand(77, generator=g) > 0.5
    out["steps"] = torch.arange(33, dtype=torch.int64)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("remote-ckpts")
    state = _state()
    st_dir = root / "st"
    st_dir.mkdir()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(st_dir / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    import json

    (st_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (st_dir / "config.json").write_text('{"note": "carried"}')
    st_file = root / "one.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_file))
    fck = root / "ck.fastckpt"
    state2 = _state(24)
    gen2 = tmp_path_factory.mktemp("remote-gen2")
    st_file2 = gen2 / "one.safetensors"
    save_file({k: v.contiguous() for k, v in state2.items()}, str(st_file2))
    fck2 = gen2 / "ck.fastckpt"
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTCKPT_CHECKSUM_CHUNK_BYTES", str(CHUNK))
    try:
        fastckpt.convert(st_dir, fck, partition_bytes=48 << 10)
        fastckpt.convert(st_file2, fck2, partition_bytes=48 << 10)
    finally:
        mp.undo()
    return Checkpoints(root, state, fck, st_dir, st_file, state2, fck2, st_file2)


@pytest.fixture(scope="session")
def s3_session() -> Iterator[S3Server]:
    with s3_server("models") as s3:
        yield s3


@dataclass
class Remote:
    """One test's view of the S3 server through its own fault proxy: ``upload`` puts a local
    checkpoint under a fresh prefix and returns its URL."""

    s3: S3Server
    proxy: FaultProxy

    def upload(self, local: Path | str, name: str = "") -> str:
        prefix = f"t{next(_counter)}/{name or Path(local).name}"
        return self.s3.upload_tree(str(local), prefix)

    def env(self) -> dict[str, str]:
        return {**self.s3.env, "AWS_ENDPOINT_URL": self.proxy.url}


@pytest.fixture
def remote(s3_session: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    """The S3 server behind a fresh fault proxy; the AWS environment points at the proxy (and
    nowhere else: no shared files, no instance metadata)."""
    host = s3_session.endpoint.split("://", 1)[1]
    with FaultProxy(host) as proxy:
        r = Remote(s3_session, proxy)
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        for k, v in r.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("FASTCKPT_REMOTE_RANGE_BYTES", str(CHUNK))
        monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT_S", "10")
        yield r


@dataclass
class Http:
    server: RangeServer
    proxy: FaultProxy
    root: Path

    def url(self, rel: str) -> str:
        return f"{self.proxy.url}/{rel}"


@pytest.fixture(scope="module")
def http_server(checkpoints: Checkpoints) -> Iterator[RangeServer]:
    with RangeServer(str(checkpoints.root)) as server:
        yield server


@pytest.fixture
def http(
    http_server: RangeServer, checkpoints: Checkpoints, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Http]:
    host = http_server.url.split("://", 1)[1]
    with FaultProxy(host) as proxy:
        monkeypatch.setenv("FASTCKPT_REMOTE_RANGE_BYTES", str(CHUNK))
        monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT_S", "10")
        yield Http(http_server, proxy, checkpoints.root)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        g = got[k].cpu()
        assert g.dtype == v.dtype and g.shape == v.shape, k
        assert torch.equal(g.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
