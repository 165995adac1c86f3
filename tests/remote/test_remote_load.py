"""Loads from s3:// (moto's S3 server) and http:// (the ranged file server): bitwise equal to the
local load, for fastckpt and stock safetensors, to the CPU and through the device pipeline (the
fake device), whole, streamed (iter_tensors) and lazily (fastckpt.open)."""

from __future__ import annotations

import errno
import time

import pytest

import fastckpt
from fastckpt.errors import FormatError
from fastckpt.loader import remotesource
from fastckpt.loader.devstage import fake_stage_factory

from .conftest import Checkpoints, Http, Remote, assert_same
from .faultproxy import Fault

CHUNK_SLOT = 64 << 10


@pytest.fixture
def loader():
    with fastckpt.Loader() as ld:
        yield ld


def _local(path) -> dict:
    return fastckpt.load(path, "cpu", private_copy=True)


@pytest.mark.parametrize("kind", ["fck", "st_dir", "st_file"])
def test_s3_load_is_bitwise_the_local_load(
    remote: Remote, checkpoints: Checkpoints, loader, kind: str
) -> None:
    local = getattr(checkpoints, kind)
    url = remote.upload(local)
    got, stats = loader.load(url, "cpu", stats=True)
    assert_same(got, _local(local))
    assert_same(got, checkpoints.state)
    assert stats.path_taken == "stream-map"


def test_s3_private_copy_and_verify_read_the_stream(
    remote: Remote, checkpoints: Checkpoints, loader
) -> None:
    url = remote.upload(checkpoints.fck)
    got, stats = loader.load(url, "cpu", verify=True, stats=True)
    assert stats.path_taken == "stream"  # verify reads (and checks) into private memory
    assert_same(got, checkpoints.state)
    got = loader.load(url, "cpu", private_copy=True)
    assert_same(got, checkpoints.state)


@pytest.mark.parametrize(
    "rel", ["ck.fastckpt", "st", "one.safetensors", "st/model-00002-of-00002.safetensors"]
)
def test_http_load_is_bitwise_the_local_load(
    http: Http, checkpoints: Checkpoints, loader, rel: str
) -> None:
    got = loader.load(http.url(rel), "cpu")
    assert_same(got, _local(checkpoints.root / rel))


def test_device_pipeline_reads_the_stream_through_gates(
    remote: Remote, checkpoints: Checkpoints
) -> None:
    """The C++ copy pipeline's gated reads (the fake device: host memory, real pipeline)."""
    url = remote.upload(checkpoints.fck)
    with fastckpt.Loader(device_stage=fake_stage_factory(slot_bytes=CHUNK_SLOT, slots=4)) as ld:
        got, stats = ld.load(url, "cuda:0", stats=True)
        assert stats.path_taken == "stream"
        assert_same(got, checkpoints.state)
        got = ld.load(url, "cuda:0", verify=True)
        assert_same(got, checkpoints.state)


def test_iter_tensors_yields_before_the_last_byte_arrives(
    remote: Remote, checkpoints: Checkpoints, loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTCKPT_REMOTE_CONCURRENCY", "2")
    url = remote.upload(checkpoints.fck)
    index = fastckpt.read_index(checkpoints.fck)
    last = index.partitions[-1].file
    # the last partition's ranges are held back by the server until the consumer saw tensors
    release = Fault("stall", times=100, path_contains=last, seconds=0.0)
    remote.proxy.add(release)
    gate_open = False

    def hold() -> None:
        deadline = time.monotonic() + 20  # bounded: a consumer that never gets a tensor fails
        while not gate_open and time.monotonic() < deadline:
            time.sleep(0.01)

    release.kind, release.action = "hook", hold
    seen: list[str] = []
    finished_at_first: bool | None = None
    for name, tensor in fastckpt.iter_tensors(url, "cpu", window_bytes=16 << 10, loader=loader):
        if finished_at_first is None:
            flights = [f for f in remotesource.active_flights() if f.url == url]
            assert flights and flights[0].download is not None
            finished_at_first = flights[0].download.finished.is_set()
            gate_open = True
        assert torch_equal(tensor, checkpoints.state[name])
        seen.append(name)
    assert finished_at_first is False
    assert sorted(seen) == sorted(checkpoints.state)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_lazy_open_reads_a_tensor_and_a_slice(http: Http, checkpoints: Checkpoints, loader) -> None:
    with fastckpt.open(http.url("ck.fastckpt"), loader=loader) as f:
        assert sorted(f.keys()) == sorted(checkpoints.state)
        t = f.get_tensor("layers.3.weight")
        assert torch_equal(t, checkpoints.state["layers.3.weight"])
        s = f.get_slice("layers.5.weight")[2:9]
        assert torch_equal(s, checkpoints.state["layers.5.weight"][2:9].contiguous())


def test_a_missing_object_or_bucket_names_the_url(remote: Remote, loader) -> None:
    with pytest.raises(FileNotFoundError) as e:
        loader.load("s3://models/no/such/checkpoint", "cpu")
    assert e.value.errno == errno.ENOENT and "s3://models/no/such/checkpoint" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        loader.load("s3://no-such-bucket/x.safetensors", "cpu")


def test_a_missing_http_file_names_the_url(http: Http, loader) -> None:
    with pytest.raises((FileNotFoundError, FormatError)) as e:
        loader.load(http.url("nothing-here"), "cpu")
    assert "nothing-here" in str(e.value)


def test_a_corrupt_index_is_refused_by_the_format_as_locally(
    remote: Remote, checkpoints: Checkpoints, loader, tmp_path
) -> None:
    import shutil

    bad = tmp_path / "bad.fastckpt"
    shutil.copytree(checkpoints.fck, bad)
    raw = bytearray((bad / "fastckpt.index").read_bytes())
    raw[-3] ^= 0xFF  # inside the JSON body: its checksum no longer matches
    (bad / "fastckpt.index").write_bytes(bytes(raw))
    with pytest.raises(FormatError) as local:
        fastckpt.load(bad, "cpu")
    url = remote.upload(bad)
    with pytest.raises(type(local.value)) as far:
        loader.load(url, "cpu")
    assert url in str(far.value)


def test_bad_urls_are_refused_before_any_request(loader) -> None:
    for bad in ("s3://a/x", "s3://bucket/../x", "s3://bucket/x?foo=1", "http:///x"):
        with pytest.raises(ValueError):
            loader.load(bad, "cpu")


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (PEM files), made here."""
    import datetime
    import ipaddress

    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


def test_https_load_with_the_systems_trust_settings(
    checkpoints: Checkpoints, loader, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https:// on 127.0.0.1 with a certificate made here, trusted through SSL_CERT_FILE (as a
    private CA would be); an untrusted certificate is refused."""
    import ssl

    from fastckpt.bench.localstore import RangeServer
    from fastckpt.errors import RemoteError

    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with RangeServer(str(checkpoints.root)) as server:
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        url = server.url.replace("http://", "https://")
        with pytest.raises(RemoteError, match="certificate"):  # not trusted yet: not retried
            loader.load(f"{url}/one.safetensors", "cpu")
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        from fastckpt.remote.store import forget_stores

        forget_stores()
        got = loader.load(f"{url}/ck.fastckpt", "cpu")
        assert_same(got, checkpoints.state)
        got = loader.load(f"{url}/st", "cpu")
        assert_same(got, checkpoints.state)
