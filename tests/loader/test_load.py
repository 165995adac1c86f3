"""fastckpt.load: bitwise equality with safetensors, for fastckpt and stock safetensors sources,
on CPU (and CUDA where present), across dtypes, partition counts, device maps and paths."""

from __future__ import annotations

import gc
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loader_helpers import bits
from safetensors.torch import load_file, save_file

import fastckpt
from fastckpt import io_engine
from fastckpt.format import dtypes

DTYPES = [name for name in dtypes.DTYPES if isinstance(getattr(torch, name, None), torch.dtype)]
ST_DTYPES = [n for n in DTYPES if dtypes.DTYPES[n].safetensors]
CUDA = torch.cuda.is_available()


def random_tensor(dtype_name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as the dtype (covers NaN/inf payloads; bool kept to 0/1)."""
    dt = getattr(torch, dtype_name)
    n = 1
    for s in shape:
        n *= s
    itemsize = dtypes.DTYPES[dtype_name].itemsize
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype_name == "bool":
        raw &= 1
    return raw.view(dt).reshape(shape)


def assert_same(loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(ref)
    for name, t in ref.items():
        got = loaded[name]
        assert got.dtype == t.dtype, name
        assert tuple(got.shape) == tuple(t.shape), name
        assert torch.equal(bits(got), bits(t)), name


def sample_state(gen_seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(gen_seed)
    sd = {}
    for i, name in enumerate(ST_DTYPES):
        sd[f"t.{name}"] = random_tensor(name, (3, 5 + i), g)
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    sd["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    sd["big"] = random_tensor("bfloat16", (300, 1000), g)
    return sd


@pytest.fixture
def st_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = sample_state()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


# ------------------------------------------------------------------ stock safetensors


def test_safetensors_file_bitwise(st_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = st_file
    loaded, stats = fastckpt.load(path, "cpu", stats=True)
    assert_same(loaded, load_file(str(path)))
    assert stats.kind == "safetensors"
    assert stats.tensors == len(loaded)
    assert stats.nbytes == sum(t.numel() * t.element_size() for t in loaded.values())
    assert stats.seconds > 0
    # a page-cached file is mapped (no engine needed); otherwise the engine reads it
    assert stats.engine == ("none" if stats.path_taken == "page-cache-map" else stats.engine)
    assert stats.engine in ("io_uring", "pread", "none")
    assert fastckpt.last_stats() == stats


def test_sharded_safetensors_dir(tmp_path: Path) -> None:
    sd = sample_state(1)
    names = list(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert_same(fastckpt.load(tmp_path), sd)


def _write_raw_safetensors(path: Path, specs: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file with tensors at exactly the given byte layout (no alignment)."""
    header: dict[str, Any] = {}
    offset = 0
    blob = b""
    for name, code, shape, data in specs:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blob += data
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def test_misaligned_safetensors_tensors_are_copied_correctly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    a = random_tensor("uint8", (3,), g)
    b = random_tensor("float32", (7,), g)  # lands at offset 3: not 4-byte aligned
    c = random_tensor("float64", (2, 2), g)
    path = tmp_path / "odd.safetensors"
    _write_raw_safetensors(
        path,
        [
            ("a", "U8", [3], bits(a).numpy().tobytes()),
            ("b", "F32", [7], bits(b).numpy().tobytes()),
            ("c", "F64", [2, 2], bits(c).numpy().tobytes()),
        ],
    )
    loaded = fastckpt.load(path)
    assert_same(loaded, {"a": a, "b": b, "c": c})
    assert loaded["b"].data_ptr() % 4 == 0


# ------------------------------------------------------------------ fastckpt checkpoints


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = sample_state(2)
    sd["tied.a"] = sd["big"]  # an alias, stored once
    path = tmp_path / "ck"
    fastckpt.save(sd, path, partition_bytes=256 << 10)
    return path, sd


def test_fastckpt_checkpoint_bitwise_and_tied(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = ckpt
    index = fastckpt.read_index(path)
    assert len(index.partitions) > 1
    loaded = fastckpt.load(path)
    assert_same(loaded, sd)
    assert loaded["tied.a"] is loaded["big"]
    assert list(loaded)[-1] == "tied.a"  # aliases come last


def test_views_share_one_storage_per_partition(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    index = fastckpt.read_index(path)
    loaded = fastckpt.load(path)
    by_part: dict[int, set[int]] = {}
    for name, entry in index.tensors.items():
        if entry.nbytes:
            by_part.setdefault(entry.partition, set()).add(
                loaded[name].untyped_storage().data_ptr()
            )
    assert all(len(ptrs) == 1 for ptrs in by_part.values())


@pytest.mark.parametrize(
    ("resident", "mode", "expected"),
    [
        (1.0, "direct", "page-cache-map"),
        (0.7, "direct", "page-cache-read"),
        (0.0, "direct", "direct"),
        (0.0, "buffered", "buffered"),
        (0.0, "mixed", "mixed"),
    ],
)
@pytest.mark.parametrize("engine", ["auto", "pread", "uring"])
def test_paths_and_engines_agree(
    ckpt: tuple[Path, dict[str, torch.Tensor]],
    resident: float,
    mode: str,
    expected: str,
    engine: str,
) -> None:
    path, sd = ckpt
    loader = fastckpt.Loader(engine=engine, read_mode=mode, residency=lambda p: resident)
    loaded, stats = loader.load(path, stats=True)
    assert_same(loaded, sd)
    assert stats.path_taken == expected
    assert {d[2] for d in stats.decisions if d[2] != "empty"} == {expected}


def test_dropping_tensors_never_corrupts_others(
    ckpt: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, sd = ckpt
    loaded = fastckpt.load(path)
    keep = "t.float32"
    survivor = loaded[keep]
    del loaded
    gc.collect()
    # churn the allocator so freed memory would be reused
    junk = [torch.full((1 << 16,), 7, dtype=torch.uint8) for _ in range(64)]
    assert torch.equal(bits(survivor), bits(sd[keep]))
    del junk


def test_buffers_freed_when_all_tensors_dropped(
    ckpt: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = ckpt
    refs: list[weakref.ref[Any]] = []
    real = io_engine.AlignedBuffer

    def tracked(nbytes: int, **kw: Any) -> Any:
        buf = real(nbytes, **kw)
        refs.append(weakref.ref(buf))
        return buf

    monkeypatch.setattr(io_engine, "AlignedBuffer", tracked)
    # cold and read (not mapped: a probe may measure mapping fastest on a busy machine)
    loaded = fastckpt.Loader(residency=lambda p: 0.0, read_mode="direct").load(path)
    assert refs and all(r() is not None for r in refs)
    one = loaded["big"]
    del loaded
    gc.collect()
    assert any(r() is not None for r in refs)  # 'big' still holds its partition
    del one
    gc.collect()
    assert all(r() is None for r in refs)


def test_names_subset(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = ckpt
    loaded = fastckpt.load(path, names=["scalar", "tied.a"])
    assert set(loaded) == {"scalar", "tied.a", "big"}
    assert_same(loaded, {k: sd[k] for k in loaded})


def test_cpu_device_map(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = ckpt
    loaded = fastckpt.load(path, {"t": "cpu", "": "cpu"})
    assert_same(loaded, sd)


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(st_file: tuple[Path, Any]) -> None:
    with pytest.raises(fastckpt.DeviceError, match="CUDA is not available"):
        fastckpt.load(st_file[0], "cuda:0")
    with pytest.raises(fastckpt.DeviceError, match="CUDA is not available"):
        fastckpt.load(st_file[0], {"": "cuda:1"})


def test_unknown_device(st_file: tuple[Path, Any]) -> None:
    with pytest.raises(fastckpt.DeviceError, match="unsupported device"):
        fastckpt.load(st_file[0], "tpu:0")


# ------------------------------------------------------------------ verify and failures


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_verify_passes_and_counts_chunks(ckpt: tuple[Path, Any]) -> None:
    path, sd = ckpt
    loaded, stats = fastckpt.load(path, verify=True, stats=True)
    assert_same(loaded, sd)
    index = fastckpt.read_index(path)
    assert stats.verified_chunks == sum(len(p.checksums or ()) for p in index.partitions)


def test_verify_detects_flipped_byte(ckpt: tuple[Path, Any]) -> None:
    path, _ = ckpt
    index = fastckpt.read_index(path)
    entry = index.tensors["big"]
    part = index.partitions[entry.partition]
    _flip_byte(Path(part.path), entry.offset + 1234)
    with pytest.raises(fastckpt.ChecksumError) as info:
        fastckpt.load(path, verify=True)
    assert info.value.path == part.path
    assert info.value.partition == entry.partition


def test_verify_on_safetensors_is_refused(st_file: tuple[Path, Any]) -> None:
    with pytest.raises(fastckpt.FormatError, match="needs chunk checksums"):
        fastckpt.load(st_file[0], verify=True)


def test_partition_truncated_after_indexing_fails_cleanly(
    ckpt: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = ckpt
    index = fastckpt.read_index(path)
    victim = Path(index.partitions[-1].path)
    refs: list[weakref.ref[Any]] = []
    real = io_engine.AlignedBuffer

    def tracked(nbytes: int, **kw: Any) -> Any:
        buf = real(nbytes, **kw)
        refs.append(weakref.ref(buf))
        return buf

    # Truncate between read_index and the reads: the loader must notice, not return garbage.
    os.truncate(victim, 4096)
    monkeypatch.setattr(io_engine, "AlignedBuffer", tracked)
    with pytest.raises((fastckpt.FormatError, OSError)):
        fastckpt.Loader(residency=lambda p: 0.0).load(index)
    gc.collect()
    assert all(r() is None for r in refs)


def test_missing_partition(ckpt: tuple[Path, Any]) -> None:
    path, _ = ckpt
    index = fastckpt.read_index(path)
    os.remove(index.partitions[0].path)
    with pytest.raises(fastckpt.MissingPartitionError):
        fastckpt.load(path)


# ------------------------------------------------------------------ property test


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
        ),
        min_size=1,
        max_size=10,
    ),
    partition_kib=st.sampled_from([4, 16, 1024]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[str, tuple[int, ...]]],
    partition_kib: int,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{i}": random_tensor(dt, shape, g) for i, (dt, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("prop") / "ck"
    fastckpt.save(sd, path, partition_bytes=partition_kib << 10)
    assert_same(fastckpt.load(path), sd)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("verify", [False, True])
def test_gpu_fastckpt_bitwise(ckpt: tuple[Path, Any], verify: bool) -> None:
    path, sd = ckpt
    loaded, stats = fastckpt.load(path, "cuda:0", verify=verify, stats=True)
    assert all(t.device.type == "cuda" for t in loaded.values())
    assert_same(loaded, sd)
    assert loaded["tied.a"] is loaded["big"]
    assert stats.path_taken in ("direct", "buffered", "mixed", "page-cache-read")


@pytest.mark.gpu
def test_gpu_safetensors_bitwise_incl_misaligned(st_file: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = st_file
    assert_same(fastckpt.load(path, "cuda"), load_file(str(path)))
    g = torch.Generator().manual_seed(9)
    a, b = random_tensor("uint8", (5,), g), random_tensor("bfloat16", (9,), g)
    odd = tmp_path / "odd.safetensors"
    _write_raw_safetensors(
        odd,
        [
            ("a", "U8", [5], bits(a).numpy().tobytes()),
            ("b", "BF16", [9], bits(b).numpy().tobytes()),
        ],
    )
    assert_same(fastckpt.load(odd, "cuda:0"), {"a": a, "b": b})


@pytest.mark.gpu
def test_gpu_device_map_mixed_cpu_cuda(ckpt: tuple[Path, Any]) -> None:
    path, sd = ckpt
    loaded = fastckpt.load(path, {"t": "cuda:0", "": "cpu"})
    assert_same(loaded, sd)
    assert loaded["t.float32"].device.type == "cuda"
    assert loaded["scalar"].device.type == "cpu"


@pytest.mark.gpu
def test_gpu_drop_some_and_free_all(ckpt: tuple[Path, Any]) -> None:
    path, sd = ckpt
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loaded = fastckpt.load(path, "cuda:0")
    keep = loaded["t.float32"]
    del loaded
    gc.collect()
    junk = torch.full((1 << 22,), 3, dtype=torch.uint8, device="cuda")
    assert torch.equal(bits(keep), bits(sd["t.float32"]))
    del keep, junk
    gc.collect()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
def test_gpu_verify_detects_corruption(ckpt: tuple[Path, Any]) -> None:
    path, _ = ckpt
    index = fastckpt.read_index(path)
    entry = index.tensors["big"]
    _flip_byte(Path(index.partitions[entry.partition].path), entry.offset + 77)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(fastckpt.ChecksumError):
        fastckpt.load(path, "cuda:0", verify=True)
    gc.collect()
    assert torch.cuda.memory_allocated() == before
