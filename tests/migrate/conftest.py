"""Fixtures of the migration tests: a tiny random Llama checkpoint, a source engine in this
process and a target server in another process, each made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LEASE_S = 2.0


@pytest.fixture(scope="session")
def llama_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from migrate_helpers import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("migrate-f32"))


@pytest.fixture(scope="session")
def source_engine(llama_f32: Path) -> Any:
    from fastckpt.migrate import ReferenceEngine

    return ReferenceEngine.from_checkpoint(llama_f32)


@pytest.fixture(scope="session")
def target_server(llama_f32: Path) -> Iterator[Any]:
    from migrate_helpers import start_server

    # --background-load: the server accepts before its weights arrive (the first prefill waits)
    server = start_server(
        llama_f32, lease_s=LEASE_S, extra=("--background-load", "--exit-on-stdin-eof")
    )
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.returncode == 0, "the target server did not stop cleanly on SIGTERM"
