"""The interpreter the vLLM end-to-end tests run their scripts in: ``FASTCKPT_VLLM_PYTHON`` (the
venv of ``tests/vllm_plugin/make_venv.sh``), else this one when it can import the modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vllm_python(*modules: str) -> str:
    """That interpreter, checked to import ``fastckpt`` from this checkout and ``modules``;
    skips the test (saying how to enable it) where there is none."""
    python = os.environ.get("FASTCKPT_VLLM_PYTHON")
    if not python:
        # real packages (origin set), not namespace packages some folder on sys.path may form
        specs = [importlib.util.find_spec(m.split(".")[0]) for m in modules]
        if not all(s is not None and s.origin is not None for s in specs):
            pytest.skip(
                f"{' and '.join(modules)} not importable here; build their venv with "
                "`bash tests/vllm_plugin/make_venv.sh` and set "
                "FASTCKPT_VLLM_PYTHON=.vllm-venv/bin/python"
            )
        python = sys.executable
    imports = ", ".join(("fastckpt", *modules))
    where = subprocess.run(
        [python, "-c", f"import {imports}; print(fastckpt.__file__)"],
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, (
        f"{python} cannot import {imports} (tests/vllm_plugin/make_venv.sh installs them):\n"
        f"{where.stderr[-2000:]}"
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(ROOT), (
        f"{python} imports fastckpt from {where.stdout.strip()}, not from this checkout {ROOT}; "
        "rebuild the venv with tests/vllm_plugin/make_venv.sh"
    )
    return python
