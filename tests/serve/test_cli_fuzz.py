"""``fastckpt cache`` against a live daemon, a config file, a corrupted partition, and the live
daemon's decoder under hypothesis."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt.cli import main
from fastckpt.loader.api import load_via_server
from fastckpt.serve import protocol
from fastckpt.serve.client import Client

from .conftest import same, save_ckpt, start_daemon


def _cache(capsys: pytest.CaptureFixture[str], sock: str, *args: str) -> Any:
    assert main(["cache", "--server", sock, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cache_commands(tmp_path: Path, daemon_factory: Any, capsys: Any) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=40)
    save_ckpt(root / "b", seed=41)
    d = daemon_factory(str(root), "8MiB")
    got = _cache(capsys, d.socket, "prefetch", str(root / "a"), str(root / "b"))
    assert [r["path"] for r in got] == [str(root / "a"), str(root / "b")]
    listed = _cache(capsys, d.socket, "ls")["entries"]
    assert [e["name"] for e in listed] == ["a", "b"] and all(e["ready"] for e in listed)
    stats = _cache(capsys, d.socket, "stats")
    assert stats["items"] == 2 and stats["misses"] == 2 and stats["memfds"] == d.memfds()
    assert _cache(capsys, d.socket, "evict", str(root / "a")) == {"evicted": 1, "in_use": 0}
    assert _cache(capsys, d.socket, "evict", "--all") == {"evicted": 1, "in_use": 0}
    assert d.memfds() == 0
    assert main(["cache", "--server", d.socket, "prefetch", str(tmp_path)]) == 1
    assert "not under the daemon's roots" in capsys.readouterr().err
    assert main(["cache", "--server", str(tmp_path / "none"), "stats"]) == 1


def test_serve_from_a_config_file(tmp_path: Path) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=42)
    sock = str(tmp_path / "run" / "sock")
    conf = tmp_path / "serve.toml"
    conf.write_text(f'socket = "{sock}"\nroots = ["{root}"]\ndram_budget = "4MiB"\n')
    d = start_daemon(sock, "", "", args=["--config", str(conf)])
    try:
        assert same(load_via_server(root / "a", server=sock), sd)
        with Client(sock) as c:
            assert c.stats()["capacity_bytes"] == 4 << 20
    finally:
        assert d.stop() == 0


def test_corrupted_partition_is_never_served(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=43)
    part = sorted(p for p in (root / "a").iterdir() if p.name != "fastckpt.index")[0]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    d = daemon_factory(str(root))
    assert load_via_server(root / "a", server=d.socket) is None  # falls back, quietly
    with Client(d.socket) as c:
        s = c.stats()
    assert s["fill_failures"] == 1 and s["items"] == 0 and d.memfds() == 0
    with pytest.raises(fastckpt.ChecksumError):
        fastckpt.load(root / "a", verify=True)


def test_verify_checks_the_daemons_bytes_on_the_client(tmp_path: Path, daemon_factory: Any) -> None:
    """``verify=True`` does not take the daemon's word: the client checks every chunk of the
    sealed copy it maps, whether or not the daemon verified its fill."""
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=44)
    d = daemon_factory(str(root), "4MiB", "--no-verify")
    got, st = load_via_server(root / "a", verify=True, stats=True, server=d.socket)
    total = sum(len(p.checksums or ()) for p in fastckpt.read_index(root / "a").partitions)
    assert same(got, sd) and st.path_taken == "daemon" and st.verified_chunks == total > 0


frames = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda kind, body, version: (
            protocol.HEADER.pack(protocol.MAGIC, version, kind, len(body)) + body
        ),
        st.integers(0, 200),
        st.one_of(st.binary(max_size=100), st.text(max_size=60).map(str.encode)),
        st.sampled_from([1, 1, 1, 0, 2]),
    ),
    st.builds(
        lambda name, root: protocol.encode(
            protocol.GET, {"root": root, "name": name, "identity": "x"}
        ),
        st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
        st.integers(0, 3),
    ),
)


def test_live_daemon_survives_fuzzed_requests(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=45)
    d = daemon_factory(str(root))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames)
    def send(frame: bytes) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(d.socket)
        try:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
        assert d.proc.poll() is None

    send()
    assert same(load_via_server(root / "a", server=d.socket), sd)
    with Client(d.socket) as c:
        assert c.stats()["fills"] == 1


def test_server_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastckpt.config import get_config

    monkeypatch.delenv("FASTCKPT_SERVER", raising=False)
    assert get_config().server == ""
    monkeypatch.setenv("FASTCKPT_SERVER", "/Run/Fastckpt/Sock")  # a path keeps its case
    monkeypatch.setenv("FASTCKPT_SERVER_TIMEOUT_S", "2.5")
    cfg = get_config()
    assert (cfg.server, cfg.server_timeout_s) == ("/Run/Fastckpt/Sock", 2.5)
    monkeypatch.setenv("FASTCKPT_IO_ENGINE", "PREAD")  # choices still normalised
    assert get_config().io_engine == "pread"
