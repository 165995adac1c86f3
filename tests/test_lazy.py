"""fastckpt.open against safetensors.safe_open on the same files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import fastckpt  # noqa: E402
from fastckpt.format import dtypes  # noqa: E402

KEYS: list[Any] = [
    0,
    -1,
    slice(1, 3),
    slice(None, None, 2),
    slice(-3, -1),
    slice(-100, 100),
    slice(2, 2),
    (slice(None), 1),
    (Ellipsis, -1),
    (slice(1, None), slice(None, None, 3)),
    (slice(None), slice(2, 7, 2)),
    (0, 0),
    (-1, slice(-5, None)),
    (1, Ellipsis, slice(None, None, 2)),
    (),
    Ellipsis,
    (slice(None, None, 5), -2, slice(1, 2)),
]


def _torch_dtypes() -> list[Any]:
    out = []
    for d in dtypes.DTYPES.values():
        if d.safetensors is None or d.name.startswith("float4"):
            continue  # packed float4 (two values a byte) has shape rules of its own: test_hardening
        found = getattr(torch, d.name, None)
        if isinstance(found, torch.dtype):
            out.append(found)
    return out


def _tensor(shape: tuple[int, ...], dtype: Any, gen: torch.Generator) -> Any:
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), generator=gen)
    t = raw.to(torch.uint8)
    if dtype == torch.bool:
        return (t % 2).bool().reshape(shape)
    if dtype.is_floating_point:  # finite values only (NaN payloads compare fine bitwise, too)
        return torch.randn(shape, generator=gen).to(dtype)
    return t.view(dtype).reshape(shape)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lazy")
    gen = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    for i, dtype in enumerate(_torch_dtypes()):
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.3d"] = _tensor((6, 5, 8), dtype, gen)
        state[f"{name}.1d"] = _tensor((11,), dtype, gen)
        state[f"{name}.0d"] = _tensor((), dtype, gen)
        state[f"{name}.empty"] = _tensor((0, 4), dtype, gen)
        state[f"{name}.2d"] = _tensor((7 + i % 3, 9), dtype, gen)
    single = root / "one.safetensors"
    save_file(state, str(single), metadata={"format": "pt", "note": "x"})
    converted = root / "one.fastckpt"
    fastckpt.convert(single, converted)
    return {"safetensors": single, "fastckpt": converted}


def _bits(t: Any) -> Any:
    t = t.reshape(-1).clone(
        memory_format=torch.contiguous_format
    )  # a size-1 view keeps odd strides
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def _same(a: Any, b: Any) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.is_contiguous()
    assert torch.equal(_bits(a), _bits(b))


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:
        return "error", exc


@pytest.mark.parametrize("kind", ["safetensors", "fastckpt"])
def test_open_matches_safe_open(kind: str, files: dict[str, Path]) -> None:
    ref_path = str(files["safetensors"])
    with safe_open(ref_path, "pt") as ref, fastckpt.open(files[kind], device="cpu") as ours:
        assert ours.keys() == ref.keys()
        assert ours.metadata() == ref.metadata()
        rng = random.Random(0)
        for name in ref.keys():  # noqa: SIM118 (safe_open has no __iter__)
            _same(ours.get_tensor(name), ref.get_tensor(name))
            a, b = ours.get_slice(name), ref.get_slice(name)
            assert a.get_shape() == b.get_shape()
            assert a.get_dtype() == b.get_dtype()
            keys = list(KEYS)
            shape = b.get_shape()
            for _ in range(12):  # random slices with steps and negative bounds
                key = tuple(
                    slice(rng.randint(-n - 2, n + 2), rng.randint(-n - 2, n + 2), rng.randint(1, 4))
                    if rng.random() < 0.7
                    else rng.randint(-n, n - 1)
                    if n
                    else slice(None)
                    for n in shape
                )
                keys.append(key)
            for key in keys:
                want = _outcome(lambda key=key, b=b: b[key])
                got = _outcome(lambda key=key, a=a: a[key])
                assert got[0] == want[0], (name, key, got, want)
                if want[0] == "ok":
                    _same(got[1], want[1])


def test_slices_read_only_what_they_need(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.arange(1000 * 256, dtype=torch.float32).reshape(1000, 256)}, str(path))
    row = 256 * 4
    with fastckpt.open(path) as f:
        s = f.get_slice("w")
        assert torch.equal(s[10:20], torch.arange(10 * 256, 20 * 256.0).reshape(10, 256))
        assert f.bytes_read == 10 * row
        s[500, 3]
        assert f.bytes_read == 10 * row + 4
        col = s[:, 7]
        assert torch.equal(col, torch.arange(1000) * 256.0 + 7)
        assert f.bytes_read == 10 * row + 4 + 1000 * 4  # one element per row, not every row
        s[:, 10:250]  # most of each row: the whole span in one read (at most 2x the bytes)
        assert f.bytes_read == 10 * row + 4 + 1000 * 4 + 1000 * row


def test_alias_names_and_errors(tmp_path: Path) -> None:
    emb = torch.randn(8, 4)
    fastckpt.save({"emb": emb, "head": emb}, tmp_path / "tied.fastckpt")
    with fastckpt.open(tmp_path / "tied.fastckpt") as f:
        assert f.keys() == ["emb", "head"]
        assert torch.equal(f.get_tensor("head"), emb)
        assert "head" in f and "nope" not in f
        with pytest.raises(KeyError, match="nope"):
            f.get_tensor("nope")
        with pytest.raises(ValueError, match="step"):
            f.get_slice("emb")[::-1]
        with pytest.raises(IndexError):
            f.get_slice("emb")[8]
        with pytest.raises(TypeError):
            f.get_slice("emb")[None]
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("emb")
    with pytest.raises(ValueError, match="framework"):
        fastckpt.open(tmp_path / "tied.fastckpt", "np")
    with pytest.raises(fastckpt.DeviceError):
        fastckpt.open(tmp_path / "tied.fastckpt", device="tpu")
    with pytest.raises(FileNotFoundError):
        fastckpt.open(tmp_path / "missing.safetensors")


def test_truncated_file_is_refused_like_load(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(fastckpt.FormatError):
        fastckpt.load(path)
    with pytest.raises(fastckpt.FormatError):
        fastckpt.open(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda(files: dict[str, Path]) -> None:
    with pytest.raises(fastckpt.DeviceError, match="CUDA"):
        fastckpt.open(files["safetensors"], device="cuda:0")


@pytest.mark.gpu
def test_open_to_gpu(files: dict[str, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with (
        safe_open(str(files["safetensors"]), "pt") as ref,
        fastckpt.open(files["fastckpt"], device="cuda:0") as ours,
    ):
        for name in ref.keys():  # noqa: SIM118 (safe_open has no __iter__)
            got = ours.get_slice(name)[...]
            assert got.device.type == "cuda"
            _same(got.cpu(), ref.get_tensor(name))
