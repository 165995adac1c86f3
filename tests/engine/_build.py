"""Builds variants of the extension into a directory and runs engine tests against them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent

# Runs in the child: swap in the given build of the module, then run pytest.
BOOTSTRAP = textwrap.dedent(
    """
    import importlib.util, sys
    so_path, *args = sys.argv[1:]
    import fastckpt
    spec = importlib.util.spec_from_file_location("fastckpt._core", so_path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["fastckpt._core"] = core
    fastckpt._core = core
    import fastckpt.io_engine
    assert fastckpt.io_engine._core.__file__ == so_path, fastckpt.io_engine._core.__file__
    print("running the engine tests against", so_path, flush=True)
    import pytest
    sys.exit(pytest.main(args))
    """
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found")
    return path


def build_extension(build: Path, defines: Sequence[str], cxx: str | None = None) -> Path:
    """Configures and builds `_core` in `build` (Debug: quickest to compile); returns the .so."""
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 not installed")
    cmake = tool("cmake")
    ninja = tool("ninja")
    cxx = cxx or os.environ.get("CXX") or tool("g++")
    configure = [
        cmake, "-S", str(REPO), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DCMAKE_CXX_COMPILER={cxx}",
        "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        *defines,
    ]  # fmt: skip
    done = subprocess.run(configure, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    build_target(build, "_core")
    so_path = build / f"_core{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert so_path.exists()
    return so_path


def build_target(build: Path, target: str) -> None:
    """Builds one target of a configured build directory; no compiler warning is allowed."""
    done = subprocess.run(
        [tool("cmake"), "--build", str(build), "--target", target, "-j", "2"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "warning:" not in done.stdout + done.stderr, done.stdout[-4000:]


def run_tests_against(so_path: Path, args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Runs pytest with `args` in a subprocess importing `so_path` as fastckpt._core."""
    child_env = dict(os.environ if env is None else env)
    child_env.pop("PYTEST_ADDOPTS", None)
    child = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, str(so_path), "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = child.stdout + child.stderr
    assert child.returncode == 0, out[-8000:]
    assert "running the engine tests against" in out
    return out
