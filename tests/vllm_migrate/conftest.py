"""Fixtures of the vLLM migration tests: a tiny random Llama, a source ``VllmEngine`` in this
process (stepped by the tests) and a target server process (``fastckpt.migrate.serve --engine
vllm``), each made once per session.

These tests need vLLM in the interpreter that runs pytest: the venv of
``tests/vllm_plugin/make_venv.sh``::

    .vllm-venv/bin/python -m pytest -q tests/vllm_migrate

Elsewhere (the main suite) they are skipped. Both engines run vLLM's CPU build with its engine
core and model in one process each (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's single-process
executor, which skips a worker process and a second vLLM import per engine), on one OpenMP
thread each (below).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migrate"))

from vllm_migrate_helpers import ENGINE_ARGS, build_llama, start_vllm_target

# Read by vLLM, and by OpenMP when torch loads: set before anything imports them. One OpenMP
# thread per engine, not pinned to a core (on a shared machine the pinned core may be the busy
# one; pinned, the same steps took ten times longer on this project's VM).
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout carries the server's one line
    "TOKENIZERS_PARALLELISM": "false",
}
# Only where these tests run: the main suite imports this file too, and its other tests (and the
# processes they start) must not inherit one OpenMP thread or vLLM's single-process mode.
if importlib.util.find_spec("vllm") is not None:
    for _key, _value in ENGINE_ENV.items():
        os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(
        "vllm",
        reason="vLLM is not importable here: build its venv with "
        "`bash tests/vllm_plugin/make_venv.sh`, then run "
        "`.vllm-venv/bin/python -m pytest -q tests/vllm_migrate`",
    )
    return build_llama(tmp_path_factory.mktemp("vllm-migrate"))


@pytest.fixture(scope="session")
def source_engine(vllm_model: Path) -> Iterator[Any]:
    from fastckpt.migrate.vllm import VllmEngine

    engine = VllmEngine.from_args(vllm_model, **ENGINE_ARGS)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def target_server(vllm_model: Path) -> Iterator[Any]:
    server = start_vllm_target(vllm_model)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.returncode == 0, "the vLLM target server did not stop cleanly on SIGTERM"
