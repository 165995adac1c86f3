"""The drop-in says why it leaves a call to transformers, for every kind of name: a file, a
local path that does not exist (transformers then speaks only of Hub repo ids), a peft adapter
folder (it used to say nothing, or "no config.json")."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
from tiny_models import Tiny

from fastckpt.integrations import transformers as fck_transformers

LOGGER = "fastckpt.integrations.transformers"


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_files_and_missing_local_paths_are_named_with_a_warning(
    tmp_path: Path,
    tiny_factory: Callable[[str], Tiny],
    caplog: pytest.LogCaptureFixture,
    drop_in_off: None,
) -> None:
    tiny = tiny_factory("llama")
    weights = str(Path(tiny.src) / "model.safetensors")
    missing = str(tmp_path / "no-such-model")
    with fck_transformers.enabled(), caplog.at_level(logging.DEBUG, logger=LOGGER):
        for name in (weights, missing):
            # transformers' own error (it takes these for Hub repo ids) is not ours to check
            with contextlib.suppress(Exception):
                transformers.AutoModelForCausalLM.from_pretrained(name)
        with contextlib.suppress(Exception):
            transformers.AutoModelForCausalLM.from_pretrained(tiny.src, subfolder="nope")
        with contextlib.suppress(Exception):  # a model class: the drop-in's own patch
            transformers.LlamaForCausalLM.from_pretrained(missing + "-too")
    # the Auto classes are as they were
    auto = transformers.AutoModelForCausalLM.__dict__["from_pretrained"].__func__
    assert not getattr(auto, "__fastckpt_patch__", False)
    warnings = _records(caplog, logging.WARNING)
    assert any(weights in m and "a file, not a model folder" in m for m in warnings), warnings
    assert any(missing in m and "no such local folder" in m for m in warnings), warnings
    assert any(missing + "-too" in m and "no such local folder" in m for m in warnings)
    nested = str(Path(tiny.src) / "nope")
    assert any(nested in m and "no such local folder" in m for m in warnings), warnings


def test_an_adapter_folder_is_named_as_one(
    tmp_path: Path,
    tiny_factory: Callable[[str], Tiny],
    caplog: pytest.LogCaptureFixture,
    drop_in_off: None,
) -> None:
    peft = pytest.importorskip("peft")
    tiny = tiny_factory("llama")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny.src)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    peft.get_peft_model(base, config).save_pretrained(adapter)
    loaded: Any = None
    with fck_transformers.enabled(), caplog.at_level(logging.DEBUG, logger=LOGGER):
        # transformers loads the base model the adapter names, then the adapter
        loaded = transformers.AutoModelForCausalLM.from_pretrained(adapter)
    assert loaded is not None
    debug = _records(caplog, logging.DEBUG)
    assert any(str(adapter) in m and "a peft adapter folder" in m for m in debug), debug
    assert not any("no config.json" in m for m in debug)
    # the base model's load says which adapter it is for
    assert any(tiny.src in m and str(adapter) in m for m in debug), debug
