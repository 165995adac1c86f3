"""fastckpt.iter_tensors: storage order, same bytes as fastckpt.load, bounded read-ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

import fastckpt  # noqa: E402


def _bits(t: Any) -> Any:
    t = t.reshape(-1).clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(300, 64, generator=gen).to(torch.bfloat16),
        "layers.0.w": torch.randn(64, 200, generator=gen),
        "layers.0.bias": torch.randn(200, generator=gen).to(torch.float16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 5),
        "mask": torch.rand(33, generator=gen) > 0.5,
        "layers.1.w": torch.randn(128, 128, generator=gen).to(torch.float64),
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    state = _state()
    sharded = root / "sharded"
    sharded.mkdir()
    names = list(state)
    save_file({n: state[n] for n in names[:3]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: state[n] for n in names[3:]}, str(sharded / "model-00002-of-00002.safetensors"))
    tied = dict(state)
    tied["lm_head.weight"] = tied["embed.weight"]
    fastckpt.save(tied, root / "tied.fastckpt")
    return {"sharded": sharded, "tied": root / "tied.fastckpt"}


@pytest.mark.parametrize("kind", ["sharded", "tied"])
@pytest.mark.parametrize("window", [None, 1, 40_000])
def test_same_tensors_as_load_in_storage_order(
    kind: str, window: int | None, ckpts: dict[str, Path]
) -> None:
    path = ckpts[kind]
    index = fastckpt.read_index(path)
    ref = fastckpt.load(path)
    got = list(fastckpt.iter_tensors(path, window_bytes=window))
    names = [n for n, _ in got]
    # storage order; each alias right after its target
    expected: list[str] = []
    for name in index.tensors:
        expected.append(name)
        expected += [a for a, t in index.aliases.items() if t == name]
    assert names == expected
    assert sorted(names) == sorted(ref)
    out = dict(got)
    for name, tensor in out.items():
        assert tensor.dtype == ref[name].dtype and tensor.shape == ref[name].shape, name
        assert tensor.device.type == "cpu"
        assert torch.equal(_bits(tensor), _bits(ref[name])), name
    for alias, target in index.aliases.items():
        assert out[alias] is out[target]


def test_names_filter_keeps_storage_order(ckpts: dict[str, Path]) -> None:
    got = [n for n, _ in fastckpt.iter_tensors(ckpts["tied"], names=["lm_head.weight", "scalar"])]
    assert got == ["lm_head.weight", "scalar"] or got == ["scalar", "lm_head.weight"]
    index = fastckpt.read_index(ckpts["tied"])
    order = list(index.tensors)
    target = index.aliases["lm_head.weight"]
    assert got == sorted(got, key=lambda n: order.index(index.aliases.get(n, n)))
    assert target not in got
    with pytest.raises(KeyError, match="nope"):
        fastckpt.iter_tensors(ckpts["tied"], names=["nope"])


def test_bad_arguments(ckpts: dict[str, Path]) -> None:
    with pytest.raises(fastckpt.DeviceError):
        fastckpt.iter_tensors(ckpts["tied"], device="tpu")
    with pytest.raises(ValueError, match="window_bytes"):
        fastckpt.iter_tensors(ckpts["tied"], window_bytes=0)
    with pytest.raises(FileNotFoundError):
        fastckpt.iter_tensors(ckpts["tied"].parent / "missing")
    if not torch.cuda.is_available():
        with pytest.raises(fastckpt.DeviceError, match="CUDA"):
            fastckpt.iter_tensors(ckpts["tied"], device="cuda:0")


def test_file_truncated_after_open_raises(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, str(path))
    stream = fastckpt.iter_tensors(path, window_bytes=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(fastckpt.TruncatedError):
        list(stream)


@pytest.mark.gpu
def test_stream_to_gpu(ckpts: dict[str, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for kind in ("sharded", "tied"):
        ref = fastckpt.load(ckpts[kind])
        got = dict(fastckpt.iter_tensors(ckpts[kind], device="cuda:0", window_bytes=64 * 1024))
        assert got.keys() == ref.keys()
        for name, tensor in got.items():
            assert tensor.device.type == "cuda"
            assert torch.equal(_bits(tensor.cpu()), _bits(ref[name])), name
