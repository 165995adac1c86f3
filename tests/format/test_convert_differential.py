"""Issue #8 acceptance: for every source kind the converter takes, converted bytes equal what the
source's own reader returns (hypothesis: dtypes, shapes, views, shared storages, stored and
DEFLATE-compressed zip records)."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fastckpt

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int8,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]
KINDS = ["safetensors", "sharded", "zip-stored", "zip-deflated", "legacy", "transformers", "peft"]


@st.composite
def state_dicts(draw: Any, views: bool, legacy: bool = False) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 4))
    out: dict[str, torch.Tensor] = {}
    # torch's legacy (non-zip) serialization cannot write float8 tensors at all.
    choices = [d for d in DTYPES if not (legacy and d.is_floating_point and d.itemsize == 1)]
    for i in range(n):
        dtype = draw(st.sampled_from(choices))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        numel = 1
        for d in shape:
            numel *= d
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (numel * dtype.itemsize,))
        t = (
            raw.to(torch.uint8).view(dtype).reshape(shape)
            if numel
            else torch.empty(shape, dtype=dtype)
        )
        out[f"t{i}"] = t
        if views and t.dim() >= 2 and numel and draw(st.booleans()):
            out[f"t{i}.T"] = t.transpose(0, 1)  # a non-contiguous view of the same storage
        if views and numel > 1 and draw(st.booleans()):
            out[f"t{i}.slice"] = t.reshape(-1)[1:]  # a storage offset
        if views and draw(st.booleans()):
            out[f"t{i}.tied"] = t  # the same view: stored once, an alias
    return out


def _rezip_deflated(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(path)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no views: one contiguous copy per name."""
    return {k: v.contiguous().clone() for k, v in sd.items()}


def write_source(kind: str, sd: dict[str, torch.Tensor], root: Path) -> tuple[Path, Any]:
    """Write ``sd`` as a ``kind`` source under ``root``; return its path and the source's own
    reading of it (safetensors.torch / torch.load(weights_only=True))."""
    if kind in ("safetensors", "transformers", "peft", "sharded"):
        flat = _contiguous(sd)
        if kind == "safetensors":
            path = root / "w.safetensors"
            save_file(flat, str(path))
            return path, load_file(str(path))
        if kind == "sharded":
            names = sorted(flat)
            half = max(1, len(names) // 2)
            save_file({k: flat[k] for k in names[:half]}, str(root / "a.safetensors"))
            save_file({k: flat[k] for k in names[half:]}, str(root / "b.safetensors"))
            ref = load_file(str(root / "a.safetensors"))
            ref.update(load_file(str(root / "b.safetensors")))
            return root, ref
        weights = "model.safetensors" if kind == "transformers" else "adapter_model.safetensors"
        config = "config.json" if kind == "transformers" else "adapter_config.json"
        save_file(flat, str(root / weights))
        (root / config).write_text(json.dumps({"x": 1}))
        return root, load_file(str(root / weights))
    path = root / "w.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=kind != "legacy")
    if kind == "zip-deflated":
        _rezip_deflated(path)
    return path, torch.load(path, weights_only=True)


def _bytes(t: torch.Tensor) -> bytes:
    return (
        bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""
    )


@pytest.mark.parametrize("kind", KINDS)
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_converted_bytes_equal_the_source_readers(kind: str, data: Any) -> None:
    views = kind not in ("safetensors", "sharded", "transformers", "peft")
    sd = data.draw(state_dicts(views, legacy=kind == "legacy"))
    root = Path(tempfile.mkdtemp(prefix="fckdiff-"))
    try:
        (root / "src").mkdir()
        src, ref = write_source(kind, sd, root / "src")
        fastckpt.convert(src, root / "ck")
        out = fastckpt.load(root / "ck")
        assert sorted(out) == sorted(ref)
        for name, t in ref.items():
            assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
            assert _bytes(out[name]) == _bytes(t), name
    finally:
        shutil.rmtree(root)
