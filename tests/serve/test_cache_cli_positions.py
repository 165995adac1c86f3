"""``fastckpt cache`` takes ``--server`` and ``--json`` before its action and after it, as
docs/serve.md shows (`fastckpt cache stats --server S` was refused), against a live daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fastckpt.cli import main

from .conftest import save_ckpt


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_server_and_json_before_or_after_the_action(
    tmp_path: Path, daemon_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=7)
    sock = daemon_factory(str(root), "8MiB").socket
    a = str(root / "a")

    got = _json(capsys, ["cache", "prefetch", a, "--server", sock, "--json"])
    assert [r["path"] for r in got] == [a]
    stats = [
        _json(capsys, argv)
        for argv in (
            ["cache", "stats", "--server", sock, "--json"],
            ["cache", "--server", sock, "stats", "--json"],
            ["cache", "--json", "stats", "--server", sock],
            ["cache", "--server", sock, "--json", "stats"],
        )
    ]
    assert all(s["items"] == 1 for s in stats)
    assert [s["misses"] for s in stats] == [1, 1, 1, 1]
    listed = _json(capsys, ["cache", "ls", "--server", sock, "--json"])["entries"]
    assert [e["name"] for e in listed] == ["a"]
    # text output too, with the option after the action
    assert main(["cache", "stats", "--server", sock]) == 0
    assert "items: 1" in capsys.readouterr().out
    assert _json(capsys, ["cache", "evict", "--all", "--server", sock, "--json"]) == {
        "evicted": 1,
        "in_use": 0,
    }


def test_server_after_the_action_names_an_unreachable_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-daemon")
    assert main(["cache", "stats", "--server", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastckpt: error: ") and "no-daemon" in err
    assert "unrecognized arguments" not in err
