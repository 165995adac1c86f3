"""The planner is pure: index + target -> buffers, reads, views. No files, no torch."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt.errors import DeviceError
from fastckpt.format.index import Index, PartitionEntry, TensorEntry
from fastckpt.loader.plan import PAGE, device_for, plan_load, resolve_device


def make_index(
    layout: list[list[tuple[str, int, int, str, tuple[int, ...]]]],
    *,
    aliases: dict[str, str] | None = None,
    checksum_chunk: int | None = None,
) -> Index:
    """layout[p] = [(name, offset, nbytes, dtype, shape), ...] for partition p."""
    tensors: dict[str, TensorEntry] = {}
    parts = []
    for p, entries in enumerate(layout):
        end = max((o + n for _, o, n, _, _ in entries), default=0)
        size = -(-end // PAGE) * PAGE
        checksums = None
        if checksum_chunk:
            checksums = tuple(range(-(-size // checksum_chunk)))
        parts.append(PartitionEntry(f"p{p}", f"/x/p{p}", size, 0, size, None, checksums))
        for name, off, nb, dt, shape in entries:
            tensors[name] = TensorEntry(name, p, off, nb, dt, shape)
    return Index(
        root="/x",
        kind="fastckpt",
        version=(1, 0),
        tensors=tensors,
        partitions=tuple(parts),
        aliases=aliases or {},
        checksum_algorithm="crc32c" if checksum_chunk else None,
        checksum_chunk_bytes=checksum_chunk,
    )


def test_plan_imports_no_torch() -> None:
    # The planner must run on a scheduler node without torch.
    import subprocess

    code = (
        "import sys, fastckpt.loader.plan, fastckpt.format.index; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'fastckpt._core' not in sys.modules, '_core imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_single_partition_cpu_views_follow_file_layout() -> None:
    idx = make_index(
        [
            [
                ("a", 0, 16, "float32", (4,)),
                ("b", 256, 8, "float16", (2, 2)),
                ("c", 512, 0, "int8", (0,)),
            ]
        ]
    )
    plan = plan_load(idx, "cpu")
    assert len(plan.buffers) == 1
    (buf,) = plan.buffers
    assert buf.device == "cpu" and buf.nbytes == PAGE
    assert [(r.file_offset, r.nbytes, r.dest_offset) for r in plan.reads] == [(0, PAGE, 0)]
    views = {v.name: v for v in plan.views}
    assert views["a"].rel_offset == 0 and views["b"].rel_offset == 256
    assert all(v.aligned for v in plan.views)
    assert plan.tensor_nbytes == 24


def test_reads_split_at_chunk_bytes() -> None:
    idx = make_index([[("w", 0, 10 * PAGE + 3, "uint8", (10 * PAGE + 3,))]])
    plan = plan_load(idx, "cpu", chunk_bytes=4 * PAGE)
    pieces = [(r.file_offset, r.nbytes) for r in plan.reads]
    assert pieces == [(0, 4 * PAGE), (4 * PAGE, 4 * PAGE), (8 * PAGE, 3 * PAGE)]
    assert sum(n for _, n in pieces) == plan.buffers[0].nbytes


def test_device_map_longest_prefix_on_dot_boundaries() -> None:
    dmap = {"model.layers.1": "cuda:1", "model": "cuda:0", "": "cpu"}
    assert device_for("model.layers.1.w", dmap) == "cuda:1"
    assert device_for("model.layers.10.w", dmap) == "cuda:0"
    assert device_for("lm_head.weight", dmap) == "cpu"
    assert device_for("x", {"y": "cpu"}) is None


def test_device_map_groups_buffers_per_device() -> None:
    idx = make_index(
        [
            [
                ("model.a", 0, 4 * PAGE, "uint8", (4 * PAGE,)),
                ("lm.b", 4 * PAGE, 4 * PAGE, "uint8", (4 * PAGE,)),
                ("model.c", 8 * PAGE, PAGE, "uint8", (PAGE,)),
            ]
        ]
    )
    plan = plan_load(idx, {"model": "cpu", "lm": "cuda:0"})
    assert {b.device for b in plan.buffers} == {"cpu", "cuda:0"}
    cpu = next(b for b in plan.buffers if b.device == "cpu")
    # model.a and model.c are 4 pages apart (< merge gap): one segment, read together
    assert len(cpu.segments) == 1
    assert plan.devices == ("cpu", "cuda:0")


def test_device_map_without_match_is_a_clear_error() -> None:
    idx = make_index([[("a", 0, 4, "float32", (1,))]])
    with pytest.raises(DeviceError, match="no device for tensor"):
        plan_load(idx, {"b": "cpu"})


def test_alias_may_be_placed_through_its_own_name() -> None:
    idx = make_index([[("emb", 0, 4, "float32", (1,))]], aliases={"head": "emb"})
    plan = plan_load(idx, {"head": "cpu"})
    assert plan.aliases == {"head": "emb"}


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "meta", -1, True])
def test_bad_devices(bad: object) -> None:
    with pytest.raises(DeviceError):
        resolve_device(bad)


def test_device_spellings() -> None:
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device(2) == "cuda:2"
    assert resolve_device("CPU") == "cpu"


def test_misaligned_tensor_is_flagged() -> None:
    idx = make_index([[("x", 9, 1, "uint8", (1,)), ("y", 10, 4, "float32", (1,))]])
    views = {v.name: v for v in plan_load(idx, "cpu").views}
    assert views["x"].aligned
    assert not views["y"].aligned


def test_names_subset_and_unknown_name() -> None:
    idx = make_index([[("a", 0, 4, "float32", (1,)), ("b", 8 * PAGE, 4, "float32", (1,))]])
    plan = plan_load(idx, "cpu", names=["b"])
    assert [v.name for v in plan.views] == ["b"]
    assert plan.read_nbytes == PAGE
    with pytest.raises(KeyError, match="nope"):
        plan_load(idx, "cpu", names=["nope"])


def test_verify_reads_whole_checksum_chunks() -> None:
    chunk = 4 * PAGE
    idx = make_index(
        [[("a", 0, 100, "uint8", (100,)), ("b", 9 * PAGE, 100, "uint8", (100,))]],
        checksum_chunk=chunk,
    )
    plan = plan_load(idx, "cpu", names=["b"], verify=True, chunk_bytes=chunk)
    # b lies in chunk 2 = [8 pages, 10 pages): the read must cover the whole chunk (file end)
    assert [(r.file_offset, r.nbytes) for r in plan.reads] == [(8 * PAGE, 2 * PAGE)]
    assert [(c.chunk, c.nbytes) for c in plan.checks] == [(2, 2 * PAGE)]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * PAGE), min_size=1, max_size=12),
    gaps=st.lists(st.integers(0, 3 * PAGE), min_size=12, max_size=12),
    parts=st.integers(1, 3),
    chunk_pages=st.integers(1, 8),
)
def test_plan_properties(sizes: list[int], gaps: list[int], parts: int, chunk_pages: int) -> None:
    layout: list[list[tuple[str, int, int, str, tuple[int, ...]]]] = [[] for _ in range(parts)]
    cursor = [0] * parts
    for i, n in enumerate(sizes):
        p = i % parts
        off = -(-(cursor[p] + gaps[i]) // 256) * 256
        layout[p].append((f"t{i}", off, n, "uint8", (n,)))
        cursor[p] = off + n
    idx = make_index(layout)
    plan = plan_load(idx, "cpu", chunk_bytes=chunk_pages * PAGE)
    # every tensor exactly once
    assert sorted(v.name for v in plan.views) == sorted(idx.tensors)
    # every non-empty tensor's bytes are covered by reads into its buffer at the planned place
    for v in plan.views:
        e = idx.tensors[v.name]
        if e.nbytes == 0:
            continue
        covered = 0
        for r in plan.reads:
            if r.buffer != v.buffer:
                continue
            lo = max(r.file_offset, e.offset)
            hi = min(r.file_offset + r.nbytes, e.end)
            if lo < hi:
                assert r.dest_offset + (lo - r.file_offset) == v.rel_offset + (lo - e.offset)
                covered += hi - lo
        assert covered == e.nbytes
    # reads are O_DIRECT friendly: dest and file offsets agree modulo a page, pieces bounded
    for r in plan.reads:
        assert r.file_offset % PAGE == r.dest_offset % PAGE
        assert 0 < r.nbytes <= chunk_pages * PAGE
        assert r.dest_offset + r.nbytes <= plan.buffers[r.buffer].nbytes
