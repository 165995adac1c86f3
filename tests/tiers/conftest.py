from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine profiles and SSD tiers of tests go to a temporary directory, never ~/.cache."""
    root: Path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    monkeypatch.delenv("FASTCKPT_PROFILE_DIR", raising=False)
    monkeypatch.delenv("FASTCKPT_SSD_TIER_DIR", raising=False)
