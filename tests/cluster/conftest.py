"""Tests that start local multi-node Ray clusters. They are slow (minutes) and run in their own
CI step (``.ci/run``: ``FASTCKPT_CLUSTER_TESTS=1 python3 -m pytest -q tests/cluster``), not in
the main test run, where they are skipped."""

from __future__ import annotations

import os

import pytest

ENABLED = os.environ.get("FASTCKPT_CLUSTER_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(
        reason="starts Ray clusters: runs in its own CI step (FASTCKPT_CLUSTER_TESTS=1 "
        "python3 -m pytest -q tests/cluster)"
    )
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
