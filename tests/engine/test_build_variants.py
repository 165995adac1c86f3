"""The extension builds and works without liburing: pread only, and engine_info says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._build import TESTS, build_extension, run_tests_against

CHECK_NO_URING = """
import errno, pytest
from fastckpt import _core
from fastckpt.io_engine import Engine, engine_info


def test_reports_built_without_liburing():
    assert _core.uring_compiled is False
    info = engine_info("auto")
    assert info["name"] == "pread" and info["uring_compiled"] is False
    assert info["uring_error"] == "built without liburing"
    assert "built without liburing" in info["reason"]
    with Engine("auto") as e:
        assert e.name == "pread"
    with pytest.raises(OSError) as exc:
        Engine("uring")
    assert exc.value.errno == errno.ENOSYS
"""


@pytest.mark.slow
def test_without_liburing(tmp_path: Path) -> None:
    so_path = build_extension(tmp_path / "build", ["-DFASTCKPT_URING=OFF"])
    check = tmp_path / "test_no_uring.py"
    check.write_text(CHECK_NO_URING)
    run_tests_against(
        so_path,
        [
            str(check),
            str(TESTS / "test_reads.py"),
            str(TESTS / "test_faults.py"),
            str(TESTS / "test_batch.py"),
            "-x",
            "--hypothesis-seed=0",
        ],
    )
