"""``fastckpt.serve.spawn``: a daemon of one's own, started once it answers, stopped after; one
that cannot start raises with its own error and leaves no process."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastckpt.serve.client import Client
from fastckpt.serve.spawn import start_daemon, stop_daemon


def test_a_spawned_daemon_answers_and_stops(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "sock")
    proc = start_daemon(sock, str(tmp_path), "4MiB")
    try:
        with Client(sock, timeout_s=5) as c:
            assert c.roots()
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    finally:
        assert stop_daemon(proc) == 0
    assert proc.poll() is not None


def test_a_daemon_that_cannot_start_raises_its_error(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "sock")
    with pytest.raises(RuntimeError, match=r"did not start: (?s:.*)not-a-size"):
        start_daemon(sock, str(tmp_path), "not-a-size", timeout_s=30)
