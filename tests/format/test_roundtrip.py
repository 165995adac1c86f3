"""Round trips: what is written (save) or converted (every source kind) reads back bitwise equal.

Hypothesis draws dtypes (every dtype of the registry the installed torch has), shapes (0-d and
empty included), tensor counts, partition sizes (tiny caps force many partitions) and alignments.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
import torch
from _readback import assert_bitwise_equal, check_partitions, read_back
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt.format import dtypes

AVAILABLE = [n for n in dtypes.DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]
# dtypes a stock safetensors file can carry (and fastckpt's safetensors reader maps)
SAFETENSORS = [n for n in AVAILABLE if dtypes.DTYPES[n].safetensors is not None]
# torch's legacy (non-zip) serialization cannot hold float8 and the wide unsigned types
LEGACY = [
    n
    for n in AVAILABLE
    if not n.startswith(("float8", "float4")) and n not in ("uint16", "uint32", "uint64")
]

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_tensor(dtype_name: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    dt = getattr(torch, dtype_name)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dt)
    if dt == torch.bool:
        data = bytes(b & 1 for b in data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape).clone()


@st.composite
def tensors(draw: st.DrawFn, names: list[str]) -> torch.Tensor:
    dtype_name = draw(st.sampled_from(names))
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    else:  # occasionally longer, to span several pages and checksum chunks
        shape = (draw(st.integers(0, 3000)),)
    if dtype_name == "float4_e2m1fn_x2" and not shape:
        shape = (1,)  # safetensors cannot write a 0-d packed 4-bit tensor
    nbytes = math.prod(shape) * dtypes.DTYPES[dtype_name].itemsize
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return make_tensor(dtype_name, shape, data)


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    min_size=1,
    max_size=12,
).filter(lambda s: s != "__metadata__")


def state_dicts(names: list[str], max_size: int = 6) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    return st.dictionaries(NAMES, tensors(names), min_size=0, max_size=max_size)


PARTITION_BYTES = st.sampled_from([1, 300, 5000, 1 << 20])
ALIGNMENT = st.sampled_from([256, 512, 4096])


@SETTINGS
@given(
    sd=state_dicts(AVAILABLE),
    partition_bytes=PARTITION_BYTES,
    alignment=ALIGNMENT,
    tie=st.booleans(),
)
def test_save_roundtrip(sd, partition_bytes, alignment, tie) -> None:
    if tie and sd:
        sd["tied.alias"] = next(iter(sd.values()))
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "ck")
        index = fastckpt.save(sd, dst, partition_bytes=partition_bytes, alignment=alignment)
        check_partitions(index)
        back = read_back(dst)
        assert_bitwise_equal(sd, back)
        if tie and sd and next(iter(sd.values())).numel() > 0:
            assert "tied.alias" in index.aliases


def test_every_dtype_every_edge_shape(tmp_path) -> None:
    sd: dict[str, torch.Tensor] = {}
    for name in AVAILABLE:
        size = dtypes.DTYPES[name].itemsize
        sd[f"{name}.vec"] = make_tensor(name, (3, 5), os.urandom(15 * size))
        sd[f"{name}.scalar"] = make_tensor(name, (), os.urandom(size))
        sd[f"{name}.empty"] = make_tensor(name, (0, 7), b"")
    index = fastckpt.save(sd, tmp_path / "ck", partition_bytes=2000)
    assert len(index.partitions) > 1
    assert {t.dtype for t in index.tensors.values()} == set(AVAILABLE)
    assert index.tensors["float32.scalar"].shape == ()
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


@SETTINGS
@given(sd=state_dicts(SAFETENSORS), partition_bytes=PARTITION_BYTES, nshards=st.integers(1, 3))
def test_safetensors_roundtrip(sd, partition_bytes, nshards) -> None:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        names = list(sd)
        if nshards == 1:
            src = os.path.join(tmp, "model.safetensors")
            save_file(sd, src, metadata={"format": "pt"})
            reference = load_file(src)
        else:
            src = os.path.join(tmp, "shards")
            os.mkdir(src)
            weight_map = {}
            reference = {}
            for k in range(nshards):
                shard = f"model-{k + 1:05d}-of-{nshards:05d}.safetensors"
                part = {n: sd[n] for n in names[k::nshards]}
                save_file(part, os.path.join(src, shard), metadata={"format": "pt"})
                reference.update(load_file(os.path.join(src, shard)))
                weight_map.update(dict.fromkeys(part, shard))
            with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
        dst = os.path.join(tmp, "ck")
        index = fastckpt.convert(src, dst, partition_bytes=partition_bytes)
        check_partitions(index)
        back = read_back(dst)
        assert_bitwise_equal(sd, back)
        assert_bitwise_equal(reference, back)  # differential: what safetensors itself reads


@SETTINGS
@given(data=st.data(), zip_format=st.booleans(), tie=st.booleans())
def test_torch_file_roundtrip(data, zip_format, tie) -> None:
    sd = data.draw(state_dicts(AVAILABLE if zip_format else LEGACY))
    if tie and sd:
        sd["tied.alias"] = next(iter(sd.values()))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "weights.pt")
        torch.save(sd, src, _use_new_zipfile_serialization=zip_format)
        dst = os.path.join(tmp, "ck")
        index = fastckpt.convert(src, dst, partition_bytes=4096)
        check_partitions(index)
        back = read_back(dst)
        assert_bitwise_equal(sd, back)
        assert_bitwise_equal(torch.load(src, weights_only=True), back)
        if tie and sd and next(iter(sd.values())).numel() > 0:
            assert "tied.alias" in index.aliases


@pytest.mark.parametrize("alignment", [256, 65536])
def test_fastckpt_repartition_roundtrip(tmp_path, alignment) -> None:
    emb = torch.randn(64, 16)
    sd = {"emb": emb, "x": torch.randn(1000), "e": torch.empty(0), "head": emb}
    fastckpt.save(sd, tmp_path / "a", partition_bytes=1 << 30, alignment=alignment)
    index = fastckpt.convert(tmp_path / "a", tmp_path / "b", partition_bytes=4096)
    assert len(index.partitions) == 2
    assert dict(index.aliases) == {"head": "emb"}
    assert index.source["kind"] == "fastckpt"
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "b"))


def test_loader_reads_what_the_writer_wrote(tmp_path) -> None:
    """Differential: the real loader (checksums verified) agrees with the test read-back."""
    sd: dict[str, torch.Tensor] = {}
    for name in AVAILABLE:
        size = dtypes.DTYPES[name].itemsize
        sd[f"{name}.m"] = make_tensor(name, (7, 3), os.urandom(21 * size))
        sd[f"{name}.s"] = make_tensor(name, (), os.urandom(size))
        sd[f"{name}.e"] = make_tensor(name, (2, 0), b"")
    sd["tied"] = sd["float32.m"]
    fastckpt.save(sd, tmp_path / "ck", partition_bytes=3000, alignment=512)
    loaded = fastckpt.load(tmp_path / "ck", verify=True)
    assert loaded["tied"] is loaded["float32.m"]
    assert_bitwise_equal(sd, loaded)
    assert_bitwise_equal(read_back(tmp_path / "ck"), loaded)
