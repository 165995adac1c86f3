"""engine_info() and engine selection."""

from __future__ import annotations

import pytest

from fastckpt import _core, engine_info
from fastckpt.io_engine import Engine

from .conftest import needs_uring

KEYS = {
    "name",
    "reason",
    "uring_compiled",
    "uring_usable",
    "uring_error",
    "liburing_version",
    "direct_reads",
    "buffered_reads",
    "queue_depth",
    "threads",
    "chunk_bytes",
    "kind",
}


def test_public_name_resolves_to_this_module() -> None:
    import fastckpt.io_engine

    assert engine_info is fastckpt.io_engine.engine_info


@pytest.mark.parametrize("kind", ["auto", "pread"])
def test_keys_and_values(kind: str) -> None:
    info = engine_info(kind)
    assert set(info) >= KEYS
    assert info["name"] in ("io_uring", "pread")
    assert info["kind"] == kind
    assert info["reason"]
    assert info["uring_compiled"] == _core.uring_compiled
    if not info["uring_compiled"]:
        assert "built without liburing" in info["uring_error"]
    if kind == "pread":
        assert info["name"] == "pread" and info["direct_reads"] == info["buffered_reads"] == "pread"


@needs_uring
def test_auto_routes_direct_to_uring_and_buffered_to_pool() -> None:
    info = engine_info("auto")
    assert info["name"] == "io_uring"
    assert info["direct_reads"] == "io_uring" and info["buffered_reads"] == "pread"
    with Engine("auto") as e:
        assert e.info()["direct_reads"] == "io_uring"
        assert e.name == "io_uring" and e.reason == info["reason"]
    with Engine("uring") as e:
        assert e.info()["buffered_reads"] == "io_uring"


def test_config_selects_the_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCKPT_IO_ENGINE", "pread")
    monkeypatch.setenv("FASTCKPT_QUEUE_DEPTH", "7")
    monkeypatch.setenv("FASTCKPT_IO_THREADS", "3")
    monkeypatch.setenv("FASTCKPT_CHUNK_BYTES", str(1 << 20))
    info = engine_info()
    assert info["name"] == "pread" and info["kind"] == "pread"
    assert (info["queue_depth"], info["threads"], info["chunk_bytes"]) == (7, 3, 1 << 20)
    with Engine() as e:
        assert e.name == "pread"
        assert e.info()["threads"] == 3
    with Engine(threads=5) as e:  # explicit arguments win over the config
        assert e.info()["threads"] == 5


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        engine_info("fast")
