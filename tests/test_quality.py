"""Lint, format and type checks run as part of the suite, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_lint() -> None:
    r = _run("ruff", "check", "fastckpt", "tests", "benchmarks", "tools")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_format() -> None:
    r = _run("ruff", "format", "--check", "fastckpt", "tests", "benchmarks", "tools")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_package() -> None:
    pytest.importorskip("mypy")
    r = _run(sys.executable, "-m", "mypy", "fastckpt")
    assert r.returncode == 0, r.stdout + r.stderr
