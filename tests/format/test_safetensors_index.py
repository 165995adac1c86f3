"""Stock safetensors sources: read_index compared with ``safe_open``, plus a malformed corpus.

Files are generated with ``safetensors.torch.save_file`` (and by transformers/peft for real model
and adapter directories); every tensor's dtype, shape, metadata and bytes as located by our index
must match what ``safe_open`` returns.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fastckpt.errors import (
    CorruptIndexError,
    DtypeError,
    FormatError,
    LimitError,
    MissingPartitionError,
    OutOfBoundsError,
    OverlapError,
    SourceError,
    TruncatedError,
    UnsafePathError,
)
from fastckpt.format import dtypes, read_index, spec
from fastckpt.format.index import Index

SAFETENSORS_DTYPES = sorted(set(dtypes.DTYPES) - {"complex128"})  # safetensors has no C128


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def located_bytes(index: Index, name: str) -> bytes:
    e = index.entry(name)
    p = index.partitions[e.partition]
    assert p.data_start <= e.offset and e.end <= p.data_end
    with open(p.path, "rb") as f:
        f.seek(e.offset)
        return f.read(e.nbytes)


def assert_matches_safe_open(index: Index) -> None:
    """Every tensor of every shard, as safe_open sees it, is what the index says."""
    seen: set[str] = set()
    metadata: dict[str, str] = {}
    for i, part in enumerate(index.partitions):
        with safe_open(part.path, framework="pt") as f:
            for key, value in (f.metadata() or {}).items():
                metadata.setdefault(key, value)
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                e = index.tensors[name]
                assert e.partition == i
                assert dtypes.torch_dtype(e.dtype) == t.dtype
                assert e.shape == tuple(t.shape)
                assert e.nbytes == t.numel() * t.element_size()
                assert located_bytes(index, name) == as_bytes(t)
                seen.add(name)
    assert seen == set(index.tensors)
    assert dict(index.metadata) == metadata
    offsets = [(e.partition, e.offset) for e in index.tensors.values()]
    assert offsets == sorted(offsets)


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    count = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (count * dtypes.get(dtype).itemsize,), generator=g)
    raw = raw.to(torch.uint8)
    if dtype == "bool":
        raw = raw & 1
    return raw.view(dtypes.torch_dtype(dtype)).reshape(shape)


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --- against safe_open ---------------------------------------------------------------------------


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    name = st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True)
    names = draw(st.lists(name, max_size=6, unique=True))
    out = {}
    for i, name in enumerate(names):
        dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        if dtype == "float4_e2m1fn_x2" and not shape:
            shape = (1,)  # safetensors cannot write a 0-d packed 4-bit tensor
        out[name] = random_tensor(dtype, shape, i)
    return out


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sd=state_dicts(), metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)
)
def test_single_file_matches_safe_open(
    tmp_path_factory: pytest.TempPathFactory, sd: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    root = tmp_path_factory.mktemp("st")
    save_file(sd, str(root / "model.safetensors"), metadata=metadata or None)
    index = read_index(root / "model.safetensors")
    assert index.kind == "safetensors" and index.alignment == 1 and index.files == ()
    assert index.checksum_algorithm is None and index.version == (0, 0)
    p = index.partitions[0]
    (header_len,) = struct.unpack("<Q", (root / "model.safetensors").read_bytes()[:8])
    assert (p.data_start, p.data_end, p.nbytes) == (8 + header_len,) + (p.nbytes,) * 2
    assert p.nbytes == os.path.getsize(root / "model.safetensors") and p.checksums is None
    assert_matches_safe_open(index)


def test_edge_dtypes_and_shapes(tmp_path: Path) -> None:
    sd = {
        "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty3": torch.zeros(2, 0, 3, dtype=torch.int64),
        "f8": torch.randn(3, 5).to(torch.float8_e4m3fn),
        "f8b": torch.randn(7).to(torch.float8_e5m2),
        "mask": torch.tensor([True, False, True]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "u64": torch.tensor([2**63 + 5], dtype=torch.uint64),
    }
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    index = read_index(tmp_path)
    assert index.tensors["scalar_bf16"].shape == () and index.tensors["empty"].nbytes == 0
    assert index.metadata == {"format": "pt"}
    assert_matches_safe_open(index)


def test_non_contiguous_source_written_contiguous(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    save_file(
        {"t": base.t().contiguous(), "s": base[:, ::2].contiguous()},
        str(tmp_path / "a.safetensors"),
    )
    assert_matches_safe_open(read_index(tmp_path))


def shard(root: Path, groups: list[dict[str, torch.Tensor]], *, index_name: str | None) -> None:
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    if index_name is not None:
        body = {"metadata": {"total_size": 123}, "weight_map": weight_map}
        (root / index_name).write_text(json.dumps(body))


def test_sharded_directory(tmp_path: Path) -> None:
    groups = [
        {"a": torch.randn(4, 4), "b": torch.randn(3).to(torch.bfloat16)},
        {"c": torch.zeros(0), "d": torch.tensor(7, dtype=torch.int32)},
        {"e": torch.ones(5, dtype=torch.bool)},
    ]
    shard(tmp_path, groups, index_name="model.safetensors.index.json")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    (tmp_path / ".gitattributes").write_text("")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    os.mkdir(tmp_path / "sub")
    index = read_index(tmp_path)
    assert [p.file for p in index.partitions] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert index.files == ("config.json", "tokenizer.model")
    assert index.source["index"] == "model.safetensors.index.json"
    assert_matches_safe_open(index)
    assert read_index(tmp_path / "model.safetensors.index.json") == index


def test_shards_without_index_json(tmp_path: Path) -> None:
    shard(tmp_path, [{"a": torch.randn(2)}, {"b": torch.randn(3)}], index_name=None)
    index = read_index(tmp_path)
    assert len(index.partitions) == 2
    assert_matches_safe_open(index)


def test_other_index_json_name(tmp_path: Path) -> None:
    shard(
        tmp_path,
        [{"a": torch.randn(2)}],
        index_name="diffusion_pytorch_model.safetensors.index.json",
    )
    assert list(read_index(tmp_path).tensors) == ["a"]


def test_several_index_jsons_prefer_model(tmp_path: Path) -> None:
    shard(tmp_path, [{"a": torch.randn(2)}], index_name="model.safetensors.index.json")
    (tmp_path / "other.safetensors.index.json").write_text("garbage")
    assert list(read_index(tmp_path).tensors) == ["a"]
    os.rename(tmp_path / "model.safetensors.index.json", tmp_path / "x.safetensors.index.json")
    with pytest.raises(SourceError, match="several"):
        read_index(tmp_path)


def test_misaligned_tensor_is_legal(tmp_path: Path) -> None:
    header = {
        "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data section 8-aligned, as safetensors does
    write_raw(tmp_path / "m.safetensors", raw, b"\7" + struct.pack("<2f", 1.0, 2.0))
    index = read_index(tmp_path / "m.safetensors")
    assert index.tensors["f"].offset % 4 == 1
    assert_matches_safe_open(index)


def test_unusual_names_allowed_gaps_refused(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"k": "v"},
        "a b/c:d": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]},
        "é": {"dtype": "U8", "shape": [], "data_offsets": [4, 5]},
    }
    write_raw(tmp_path / "m.safetensors", header, bytes(5))
    index = read_index(tmp_path / "m.safetensors")
    assert list(index.tensors) == ["a b/c:d", "é"] and index.metadata == {"k": "v"}
    # As the safetensors library requires (issue #8 item 7): no gaps, no trailing bytes.
    header["é"]["data_offsets"] = [20, 21]
    write_raw(tmp_path / "m.safetensors", header, bytes(32))
    with pytest.raises(CorruptIndexError, match="gap"):
        read_index(tmp_path / "m.safetensors")


def test_fnuz_codes(tmp_path: Path) -> None:
    sd = {
        "a": torch.zeros(2, dtype=torch.float8_e4m3fnuz),
        "b": torch.zeros(2, dtype=torch.float8_e5m2fnuz),
        "c": torch.zeros(2, dtype=torch.float8_e8m0fnu),
    }
    save_file(sd, str(tmp_path / "m.safetensors"))
    index = read_index(tmp_path)
    assert {n: e.dtype for n, e in index.tensors.items()} == {
        "a": "float8_e4m3fnuz",
        "b": "float8_e5m2fnuz",
        "c": "float8_e8m0fnu",
    }


def test_transformers_and_peft_directories(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model", max_shard_size="8KB")
    index = read_index(tmp_path / "model")
    assert len(index.partitions) > 1
    assert "config.json" in index.files
    assert_matches_safe_open(index)

    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    adapter = read_index(tmp_path / "adapter")
    assert [p.file for p in adapter.partitions] == ["adapter_model.safetensors"]
    assert "adapter_config.json" in adapter.files
    assert any("lora_A" in n for n in adapter.tensors)
    assert_matches_safe_open(adapter)


# --- malformed safetensors -----------------------------------------------------------------------

ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _raw(header: dict[str, Any] | bytes, data: bytes = bytes(8)) -> Callable[[Path], Path]:
    return lambda tmp: write_raw(tmp / "m.safetensors", header, data)


def _bytes(raw: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / "m.safetensors").write_bytes(raw)
        return tmp / "m.safetensors"

    return build


def _sharded(
    weight_map: dict[str, Any], files: dict[str, dict[str, Any]]
) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        for name, header in files.items():
            write_raw(tmp / name, header, bytes(64))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return tmp

    return build


def _two_files_same_name(tmp: Path) -> Path:
    write_raw(tmp / "a.safetensors", {"w": ENTRY}, bytes(8))
    write_raw(tmp / "b.safetensors", {"w": ENTRY}, bytes(8))
    return tmp


MALFORMED: list[tuple[str, Callable[[Path], Path], type[FormatError]]] = [
    ("empty file", _bytes(b""), TruncatedError),
    ("shorter than length prefix", _bytes(b"\1\0\0"), TruncatedError),
    ("header length absurd", _bytes(struct.pack("<Q", 1 << 60) + b"{}"), LimitError),
    ("header length over 100 MB", _bytes(struct.pack("<Q", 100_000_001) + b"{}"), LimitError),
    ("header past end of file", _bytes(struct.pack("<Q", 50) + b"{}"), TruncatedError),
    ("header not JSON", _raw(b"{nope"), CorruptIndexError),
    ("header not UTF-8", _raw(b'{"\xff": 1}'), CorruptIndexError),
    ("header a list", _raw(b"[]"), CorruptIndexError),
    ("header empty", _raw(b""), CorruptIndexError),
    ("duplicate tensor key", _raw(b'{"a": {}, "a": {}}'), CorruptIndexError),
    ("entry not an object", _raw({"w": [1]}), CorruptIndexError),
    ("entry lacks data_offsets", _raw({"w": {"dtype": "F32", "shape": [2]}}), CorruptIndexError),
    ("unknown dtype", _raw({"w": {**ENTRY, "dtype": "F128"}}), DtypeError),
    ("float4 unsupported", _raw({"w": {**ENTRY, "dtype": "F4"}}), DtypeError),
    ("dtype not a string", _raw({"w": {**ENTRY, "dtype": 4}}), DtypeError),
    ("offsets disagree with shape", _raw({"w": {**ENTRY, "shape": [3]}}), DtypeError),
    ("negative shape", _raw({"w": {**ENTRY, "shape": [-2]}}), CorruptIndexError),
    ("huge shape product", _raw({"w": {**ENTRY, "shape": [1 << 40, 1 << 40]}}), LimitError),
    ("data_offsets reversed", _raw({"w": {**ENTRY, "data_offsets": [8, 0]}}), CorruptIndexError),
    ("data_offsets not a pair", _raw({"w": {**ENTRY, "data_offsets": [0]}}), CorruptIndexError),
    ("data_offsets negative", _raw({"w": {**ENTRY, "data_offsets": [-8, 0]}}), CorruptIndexError),
    ("data past end of file", _raw({"w": {**ENTRY, "data_offsets": [4, 12]}}), OutOfBoundsError),
    (
        "data far past end",
        _raw({"w": {**ENTRY, "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}),
        OutOfBoundsError,
    ),
    (
        "overlapping tensors",
        _raw({"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, bytes(16)),
        OverlapError,
    ),
    ("metadata not strings", _raw({"__metadata__": {"a": 1}, "w": ENTRY}), CorruptIndexError),
    ("metadata a list", _raw({"__metadata__": [], "w": ENTRY}), CorruptIndexError),
    ("same name in two shards", _two_files_same_name, CorruptIndexError),
    (
        "weight_map names missing shard",
        _sharded({"w": "gone.safetensors"}, {}),
        MissingPartitionError,
    ),
    ("weight_map escapes", _sharded({"w": "../x.safetensors"}, {}), UnsafePathError),
    ("weight_map absolute", _sharded({"w": "/etc/x.safetensors"}, {}), UnsafePathError),
    (
        "weight_map wrong shard",
        _sharded({"w": "a.safetensors"}, {"a.safetensors": {}, "b.safetensors": {"w": ENTRY}}),
        CorruptIndexError,
    ),
    (
        "weight_map tensor missing",
        _sharded({"zz": "a.safetensors"}, {"a.safetensors": {"w": ENTRY}}),
        CorruptIndexError,
    ),
    ("weight_map not an object", _sharded([], {}), CorruptIndexError),
    ("weight_map value not a string", _sharded({"w": 3}, {}), CorruptIndexError),
]


@pytest.mark.parametrize(("name", "build", "error"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_safetensors(
    tmp_path: Path, name: str, build: Callable[[Path], Path], error: type[FormatError]
) -> None:
    target = build(tmp_path)
    with pytest.raises(error) as exc:
        read_index(target)
    assert type(exc.value) is error, f"{type(exc.value).__name__}: {exc.value}"
    assert exc.value.path is not None and str(tmp_path) in exc.value.path


def test_safetensors_error_names_tensor_and_offset(tmp_path: Path) -> None:
    write_raw(tmp_path / "m.safetensors", {"w": {**ENTRY, "data_offsets": [4, 12]}}, bytes(8))
    with pytest.raises(OutOfBoundsError) as exc:
        read_index(tmp_path / "m.safetensors")
    raw_len = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]
    assert exc.value.tensor == "w" and exc.value.offset == 8 + raw_len + 4


def test_fifo_shard_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.safetensors")
    with pytest.raises(FormatError):
        read_index(tmp_path)


def test_huge_index_json_refused(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors.index.json"
    with open(p, "wb") as f:
        f.truncate(spec.MAX_SAFETENSORS_HEADER_NBYTES + 1)  # sparse: costs no disk
    with pytest.raises(LimitError):
        read_index(tmp_path)
