"""The engine tests pass against an ASan + UBSan build of the extension.

The extension is configured with ``-DFASTCKPT_SANITIZE=address,undefined`` into a temporary
directory and the engine tests run in a subprocess that imports that build as
``fastckpt._core``, with the ASan runtime preloaded (the Python interpreter itself is not
instrumented). Any sanitizer report aborts the subprocess. The same build also compiles the C++
tests of tests/engine/cpp/ (no Python at all) and runs them. To run it alone:

    python -m pytest tests/engine/test_sanitizer.py -m slow
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ._build import TESTS, build_extension, build_target, run_tests_against, tool


def _runtime(cxx: str, name: str) -> str | None:
    """The real path of a compiler runtime library, or None."""
    found = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(found) or not os.path.exists(found):
        return None
    real = os.path.realpath(found)
    with open(real, "rb") as fh:
        return real if fh.read(4) == b"\x7fELF" else None  # not a linker script


@pytest.mark.slow
def test_engine_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    cxx = os.environ.get("CXX") or tool("g++")
    asan = _runtime(cxx, "libasan.so")
    if asan is None:
        pytest.skip(f"{cxx} has no ASan runtime")
    # libstdc++ must be loaded before ASan resolves its __cxa_throw interceptor, or the first
    # C++ exception aborts (the interpreter itself does not link libstdc++).
    cxxlib = _runtime(cxx, "libstdc++.so") or "libstdc++.so.6"
    so_path = build_extension(
        tmp_path / "build",
        ["-DFASTCKPT_SANITIZE=address,undefined", "-DFASTCKPT_CPP_TESTS=ON"],
        cxx=cxx,
    )
    symbols = subprocess.run(["nm", "-D", str(so_path)], capture_output=True, text=True)
    assert "__asan" in symbols.stdout and "__ubsan" in symbols.stdout

    # The copy pipeline's C++ test: the engine library alone, instrumented the same way.
    build_target(tmp_path / "build", "copy_pipeline_test")
    sanitizer_env = dict(os.environ)
    sanitizer_env["ASAN_OPTIONS"] = "abort_on_error=1:check_initialization_order=1"
    sanitizer_env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    cpp = subprocess.run(
        [str(tmp_path / "build" / "copy_pipeline_test")],
        capture_output=True,
        text=True,
        env=sanitizer_env,
        timeout=300,
    )
    assert cpp.returncode == 0 and "all passed" in cpp.stdout, cpp.stdout + cpp.stderr[-8000:]

    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{asan} {cxxlib}"
    # Python's own allocations are never freed at exit: leak reports would only be noise.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:check_initialization_order=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    out = run_tests_against(
        so_path,
        [str(TESTS), "-x", "-m", "not slow", "-k", "not benchmark", "--hypothesis-seed=0"],
        env,
    )
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out
