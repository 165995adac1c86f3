"""Fuzzing the index parsers.

Random and mutated bytes either parse into a valid Index or raise FormatError: never another
exception, never a hang, never an allocation out of proportion to the input.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from golden_gen import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt.errors import FormatError, LimitError, TruncatedError
from fastckpt.format import dtypes, read_index, spec
from fastckpt.format.index import Index

FUZZ = settings(max_examples=150, deadline=None, derandomize=False)
HANG_GUARD_S = 30  # a hang detector, not a timing assertion: any parse here takes milliseconds


@contextmanager
def no_hang() -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise AssertionError(f"parser still running after {HANG_GUARD_S} s: it hangs")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_invariants(index: Index) -> None:
    """What a returned Index promises, re-derived independently of the reader."""
    assert index.alignment >= 1
    last: tuple[int, int] = (-1, -1)
    ends: dict[int, int] = {}
    for name, e in index.tensors.items():
        assert name == e.name
        part = index.partitions[e.partition]
        assert e.nbytes == dtypes.get(e.dtype).itemsize * math.prod(e.shape)
        assert part.data_start <= e.offset and e.offset + e.nbytes <= part.data_end
        assert part.data_end <= part.nbytes == os.path.getsize(part.path)
        assert e.offset % index.alignment == 0
        assert (e.partition, e.offset) >= last
        last = (e.partition, e.offset)
        if e.nbytes:
            assert e.offset >= ends.get(e.partition, 0), f"{name} overlaps"
            ends[e.partition] = e.end
    for alias, target in index.aliases.items():
        assert alias not in index.tensors and target in index.tensors
    for p in index.partitions:
        assert p.checksums is None or index.checksum_chunk_bytes is not None


def parse(path: Path, *, budget_bytes: int | None = None) -> None:
    """read_index must succeed (valid Index) or raise FormatError; nothing else."""
    if budget_bytes is not None:
        tracemalloc.start()
    try:
        with no_hang():
            index = read_index(path)
    except FormatError:
        return
    finally:
        if budget_bytes is not None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak <= budget_bytes, f"parser allocated {peak} bytes for a small input"
    check_invariants(index)


def budget(nbytes: int) -> int:
    """Generous memory bound for parsing ``nbytes`` of JSON (Python objects are large)."""
    return (1 << 20) + 300 * nbytes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of a golden checkpoint; the tests overwrite only its index."""
    root = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(GOLDEN / "v1.0-basic", root)
    return root


@pytest.fixture(scope="module")
def golden_index() -> bytes:
    return (GOLDEN / "v1.0-basic" / spec.INDEX_FILE).read_bytes()


def put_index(root: Path, data: bytes) -> Path:
    (root / spec.INDEX_FILE).write_bytes(data)
    return root


def with_header(body: bytes) -> bytes:
    return spec.pack_header(body) + body


# --- random input --------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(ckpt: Path, data: bytes) -> None:
    parse(put_index(ckpt, data), budget_bytes=budget(len(data)))


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_after_magic(ckpt: Path, data: bytes) -> None:
    parse(put_index(ckpt, spec.MAGIC + data), budget_bytes=budget(len(data)))


@FUZZ
@given(body=st.binary(max_size=600))
def test_random_body_with_valid_header(ckpt: Path, body: bytes) -> None:
    parse(put_index(ckpt, with_header(body)), budget_bytes=budget(len(body)))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(doc=json_values)
def test_random_json_body(ckpt: Path, doc: Any) -> None:
    parse(put_index(ckpt, with_header(json.dumps(doc).encode())))


# --- mutations of a valid index -----------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_index_bytes(ckpt: Path, golden_index: bytes, data: st.DataObject) -> None:
    raw = bytearray(golden_index)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[pos:]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
    if data.draw(st.booleans()) and len(raw) >= spec.HEADER_NBYTES:
        # Re-seal length and CRC so that the mutation reaches the JSON and field checks.
        raw = bytearray(
            raw[:16] + struct.pack("<QI", len(raw) - 32, spec.crc32c(bytes(raw[32:]))) + raw[28:]
        )
    parse(put_index(ckpt, bytes(raw)), budget_bytes=budget(len(raw)))


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):
            out += paths_of(v, (*prefix, i))
    return out


interesting_ints = st.sampled_from(
    [0, 1, -1, 255, 256, 4096, 4095, 8192, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63)]
)


@FUZZ
@given(data=st.data())
def test_mutated_body_fields(ckpt: Path, golden_index: bytes, data: st.DataObject) -> None:
    body = json.loads(golden_index[32:])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths_of(body)[1:]))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "int", "delete", "dup"]))
        if action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif action == "int":
            parent[path[-1]] = data.draw(interesting_ints | st.integers(-10, 10_000))
        elif action == "delete":
            del parent[path[-1]]
        elif action == "dup" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[path[-1]])))
    minor = data.draw(st.sampled_from([0, 0, 1, 65535]))
    if minor and isinstance(body, dict) and body.get("version") == [1, 0]:
        body["version"] = [1, minor]
    raw = json.dumps(body).encode()
    parse(put_index(ckpt, spec.pack_header(raw, minor=minor) + raw), budget_bytes=budget(len(raw)))


# --- safetensors headers -------------------------------------------------------------------------


def safetensors_bytes(header: Any, data_len: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_len)


BASE_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "BF16", "shape": [], "data_offsets": [16, 18]},
    "c": {"dtype": "BOOL", "shape": [0, 3], "data_offsets": [18, 18]},
    "d": {"dtype": "F8_E4M3", "shape": [5], "data_offsets": [18, 23]},
}


@FUZZ
@given(data=st.data())
def test_mutated_safetensors(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    header = json.loads(json.dumps(BASE_HEADER))
    for _ in range(data.draw(st.integers(0, 3))):
        path = data.draw(st.sampled_from(paths_of(header)[1:]))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(interesting_ints | st.integers(-5, 64))
        else:
            parent[path[-1]] = data.draw(json_values)
    raw = bytearray(safetensors_bytes(header, data.draw(st.integers(0, 40))))
    for _ in range(data.draw(st.integers(0, 2))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    root = tmp_path_factory.mktemp("st")
    (root / "m.safetensors").write_bytes(bytes(raw))
    parse(root / "m.safetensors", budget_bytes=budget(len(raw)))


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_safetensors_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    root = tmp_path_factory.mktemp("st")
    (root / "x.safetensors").write_bytes(data)
    parse(root / "x.safetensors", budget_bytes=budget(len(data)))


# --- absurd declared sizes allocate nothing ------------------------------------------------------


def _peak_of(path: Path, error: type[FormatError]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(error):
            read_index(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_absurd_sizes_allocate_nothing(tmp_path: Path) -> None:
    limit = 1 << 20
    idx = tmp_path / "a"
    idx.mkdir()
    hdr = struct.pack("<8sHHIQII", spec.MAGIC, 1, 0, 0, spec.MAX_BODY_NBYTES, 0, 0)
    put_index(idx, hdr + b"{}")
    assert _peak_of(idx, TruncatedError) < limit

    st_file = tmp_path / "b.safetensors"
    st_file.write_bytes(struct.pack("<Q", spec.MAX_SAFETENSORS_HEADER_NBYTES) + b"{}")
    assert _peak_of(st_file, TruncatedError) < limit

    huge = tmp_path / "c.safetensors"
    entry = {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 8]}
    huge.write_bytes(safetensors_bytes({"w": entry}, 8))
    assert _peak_of(huge, LimitError) < limit
