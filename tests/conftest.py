from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# test folders whose tests each get their own cache directory (machine profiles, SSD tiers)
_PRIVATE_CACHE_DIRS = ("loader", "tiers")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _default_run(config: pytest.Config) -> bool:
    """A run of the whole suite as the README gives it (``python3 -m pytest -q``): no paths and
    no ``-m`` on the command line."""
    return config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.getoption(
        "markexpr"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked slow (extension rebuilt under sanitizers or without liburing, the drop-in on
    # every architecture, a local Ray cluster, the GPU box script's dry run, vLLM end to end) run
    # in their own steps of .ci/run, not in the main suite: `python3 -m pytest -q -m slow`, or
    # name their file or folder.
    if _default_run(config):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _fastckpt_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Read-mode profiles and SSD tiers written by tests (and their subprocesses) go to a
    temporary directory, never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _private_cache_dir(request: pytest.FixtureRequest) -> None:
    """Machine profiles and SSD tiers of the loader and tier tests go to a fresh temporary
    directory per test, never ~/.cache, and ignore the user's FASTCKPT_PROFILE_DIR,
    FASTCKPT_SSD_TIER_DIR and FASTCKPT_SSD_CONVERT."""
    if request.path.relative_to(Path(__file__).parent).parts[0] not in _PRIVATE_CACHE_DIRS:
        return
    root: Path = request.getfixturevalue("tmp_path_factory").mktemp("cache")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    monkeypatch.delenv("FASTCKPT_PROFILE_DIR", raising=False)
    monkeypatch.delenv("FASTCKPT_SSD_TIER_DIR", raising=False)
    monkeypatch.delenv("FASTCKPT_SSD_CONVERT", raising=False)
