"""Fixtures of the vLLM migration tests: a tiny random Llama, a source ``VllmEngine`` in this
process (stepped by the tests) and a target server process (``fastckpt.migrate.serve --engine
vllm``), each made once per session.

These tests need vLLM in the interpreter that runs pytest: the venv of
``tests/vllm_plugin/make_venv.sh``::

    .vllm-venv/bin/python -m pytest -q tests/vllm_migrate

Elsewhere (the main suite) they are skipped. Both engines run vLLM's CPU build with its engine
core and model in one process each (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's single-process
executor, which skips a worker process and a second vLLM import per engine) and each is bound to
its own core when the machine has two (``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migrate"))

from vllm_migrate_helpers import ENGINE_ARGS, LEASE_S, build_llama


def _cores() -> tuple[str, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return str(cpus[0]), str(cpus[1])
    return str(cpus[0]), str(cpus[0])


def engine_env(core: str) -> dict[str, str]:
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": core,
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout carries the server's one line
        "TOKENIZERS_PARALLELISM": "false",
    }


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

    os.environ.update(engine_env(_cores()[0]))  # read by vLLM when the engine is made
    engine = VllmEngine.from_args(vllm_model, **ENGINE_ARGS)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def target_server(vllm_model: Path) -> Iterator[Any]:
    from migrate_helpers import start_server

    extra = ["--engine", "vllm", "--exit-on-stdin-eof"]
    for key, value in ENGINE_ARGS.items():
        extra += ["--vllm-arg", f"{key}={json.dumps(value)}"]
    env = dict(os.environ, **engine_env(_cores()[1]))
    server = start_server(vllm_model, lease_s=LEASE_S, extra=tuple(extra), env=env)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.returncode == 0, "the vLLM target server did not stop cleanly on SIGTERM"
