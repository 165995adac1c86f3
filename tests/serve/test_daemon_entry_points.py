"""FASTCKPT_SERVER reaches every entry point a serving platform loads through: ``load`` with an
``Index`` read before, ``load_model`` (and so the migration engine), the transformers drop-in.

Each is asked of an in-process daemon and counted by it; the tensors are checked against the
files. (``load``, ``open``, ``iter_tensors`` on a path: tests/serve/test_daemon.py and
tests/loader/test_one_core.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import fastckpt

transformers = pytest.importorskip("transformers")


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """``models/llama`` (save_pretrained, safetensors) and ``models/llama.fastckpt``."""
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    root = tmp_path / "models"
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama", safe_serialization=True)
    fastckpt.convert(root / "llama", root / "llama.fastckpt", progress=False)
    return root


def _requests(daemon: Any) -> int:
    s = daemon.daemon.stats()
    return int(s["hits"]) + int(s["misses"])


def _same_weights(model: Any, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_every_entry_point_asks_the_daemon(
    models: Path, inproc_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fck, src = models / "llama.fastckpt", models / "llama"
    monkeypatch.delenv("FASTCKPT_SERVER", raising=False)
    want = fastckpt.load(fck, "cpu")  # from the files
    d = inproc_daemon(str(models), dram_budget_bytes=16 << 20)
    monkeypatch.setenv("FASTCKPT_SERVER", d.socket)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a daemon that did not answer would warn

        # load(index=...): the index read before names the checkpoint; the daemon serves it
        index = fastckpt.read_index(fck)
        tensors, stats = fastckpt.load(fck, "cpu", index=index, stats=True)
        assert stats.path_taken == "daemon"
        assert _requests(d) == 1
        assert set(tensors) == set(want)
        assert all(
            torch.equal(tensors[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want
        )

        # load_model of a fastckpt checkpoint and of a stock safetensors folder (the migration
        # engine's ReferenceEngine.from_checkpoint loads through load_model)
        for n, path in enumerate((fck, src), start=2):
            model = fastckpt.load_model(path, device="cpu")
            assert _requests(d) == n, path
            _same_weights(model, want)

        # the transformers drop-in, through the Auto classes
        from fastckpt.transformers import enabled as drop_in

        with drop_in():
            model = transformers.AutoModelForCausalLM.from_pretrained(fck)
        assert _requests(d) == 4
        _same_weights(model, want)

    s = d.daemon.stats()
    assert (s["misses"], s["hits"]) == (2, 2)  # one fill per checkpoint, then hits


def test_without_a_server_nothing_is_asked(
    models: Path, inproc_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counter above can fail: a load without FASTCKPT_SERVER leaves it at zero."""
    monkeypatch.delenv("FASTCKPT_SERVER", raising=False)
    d = inproc_daemon(str(models))
    fck = models / "llama.fastckpt"
    _, stats = fastckpt.load(fck, "cpu", index=fastckpt.read_index(fck), stats=True)
    fastckpt.load_model(fck, device="cpu")
    assert stats.path_taken != "daemon"
    assert _requests(d) == 0
