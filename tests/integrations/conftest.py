"""Fixtures for the transformers/peft tests; the models themselves are in tiny_models.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import ARCHS, VOCAB, Tiny, build_tiny

import fastckpt

__all__ = ["ARCHS", "VOCAB", "Tiny", "build_tiny"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


_cache: dict[str, Tiny] = {}


@pytest.fixture(scope="session")
def tiny_factory(tiny_root: Path) -> Callable[[str], Tiny]:
    def get(name: str) -> Tiny:
        if name not in _cache:
            _cache[name] = build_tiny(name, tiny_root)
        return _cache[name]

    return get


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, dict[str, Any]]]:
    """Records each ``fastckpt.load`` call: (path, device, returned dict)."""
    calls: list[tuple[str, Any, dict[str, Any]]] = []
    inner = fastckpt.load

    def spy(path: Any, device: Any = "cpu", **kwargs: Any) -> Any:
        out = inner(path, device=device, **kwargs)
        calls.append((os.fspath(path), device, out))
        return out

    monkeypatch.setattr(fastckpt, "load", spy)
    return calls


@pytest.fixture
def drop_in_off() -> Iterator[None]:
    """Every test leaves from_pretrained unpatched."""
    from fastckpt.integrations import transformers as integ

    yield
    integ.disable()
