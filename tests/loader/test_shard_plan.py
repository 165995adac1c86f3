"""Shard-range planning (``shardplan.plan_shards`` and its helpers): a tensor-parallel rank reads
only the bytes it keeps. The planning is pure (no torch, no files); the last tests run the plans
through ``Loader.execute`` on real files, to the CPU and to a fake device."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt.format.index import Index, PartitionEntry, TensorEntry
from fastckpt.loader.policy import gather_runs
from fastckpt.loader.shardplan import (
    PAGE,
    box_runs,
    plan_into,
    plan_shards,
    shard_box,
    split_dim,
)

ITEMSIZE = {"float32": 4, "bfloat16": 2, "int8": 1, "float64": 8}


def _index(tensors: list[tuple[str, str, tuple[int, ...]]], *, start: int = 4096) -> Index:
    """One partition holding ``tensors`` one after the other from ``start``, 256-byte aligned."""
    entries: dict[str, TensorEntry] = {}
    off = start
    for name, dtype, shape in tensors:
        n = math.prod(shape) * ITEMSIZE[dtype]
        entries[name] = TensorEntry(name, 0, off, n, dtype, shape)
        off = -(-(off + n) // 256) * 256
    size = -(-off // PAGE) * PAGE
    part = PartitionEntry("p0", "/x/p0", size, 0, size, None, None)
    return Index(
        root="/x",
        kind="fastckpt",
        version=(1, 0),
        tensors=entries,
        partitions=(part,),
        aliases={},
    )


def _kept_bytes(shape: tuple[int, int], box: tuple[tuple[int, int], ...], item: int) -> set[int]:
    """Every byte offset (in the tensor) of the elements inside ``box``, by brute force."""
    (r0, r1), (c0, c1) = box
    cols = shape[1]
    return {
        (i * cols + j) * item + b for i in range(r0, r1) for j in range(c0, c1) for b in range(item)
    }


def _covered(ranges: list[tuple[int, int]]) -> list[int]:
    """Every byte offset the (offset, length) ranges cover, with repeats."""
    return [o + k for o, n in ranges for k in range(n)]


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
dtypes_ = st.sampled_from(sorted(ITEMSIZE))


@given(shape=shapes, dtype=dtypes_, tp=st.integers(1, 8), dim=st.integers(0, 1), data=st.data())
@settings(max_examples=300, deadline=None)
def test_runs_cover_exactly_the_bytes_the_rank_keeps(
    shape: tuple[int, int], dtype: str, tp: int, dim: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, tp - 1))
    item = ITEMSIZE[dtype]
    box = shard_box(shape, dim, rank, tp)
    runs = box_runs(shape, box, item)
    covered = _covered(runs)
    assert len(covered) == len(set(covered))  # no byte read twice
    assert set(covered) == _kept_bytes(shape, box, item)
    # runs are in order, maximal (none touches the next), and a row shard is one run
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))
    if runs and (dim == 0 or box[1] == (0, shape[1])):
        assert len(runs) == 1


@given(shape=shapes, dtype=dtypes_, tp=st.integers(1, 8), dim=st.integers(0, 1), data=st.data())
@settings(max_examples=300, deadline=None)
def test_plan_reads_exactly_the_kept_bytes_of_each_tensor(
    shape: tuple[int, int], dtype: str, tp: int, dim: int, data: st.DataObject
) -> None:
    """The plan of one rank over a checkpoint of three tensors (a sharded one between two
    whole ones): its reads cover the whole tensors and exactly the sharded tensor's kept bytes
    (read amplification 1.00), each byte once, and the views have the box's shape."""
    rank = data.draw(st.integers(0, tp - 1))
    item = ITEMSIZE[dtype]
    chunk = data.draw(st.sampled_from([PAGE, 2 * PAGE, 1 << 20]))
    idx = _index([("a", "float32", (5,)), ("w", dtype, shape), ("z", "int8", (3000,))])
    box = shard_box(shape, dim, rank, tp)
    plan = plan_shards(idx, {"a": None, "w": box, "z": None}, "cpu", chunk_bytes=chunk)
    file_bytes = _covered([(r.file_offset, r.nbytes) for r in plan.reads])
    assert len(file_bytes) == len(set(file_bytes))
    w = idx.tensors["w"]
    want = {w.offset + b for b in _kept_bytes(shape, box, item)}
    for name in ("a", "z"):
        e = idx.tensors[name]
        want |= set(range(e.offset, e.end))
    assert set(file_bytes) == want
    kept = math.prod(hi - lo for lo, hi in box) * item
    assert plan.read_nbytes == kept + idx.tensors["a"].nbytes + idx.tensors["z"].nbytes
    assert all(r.nbytes <= chunk for r in plan.reads)
    views = {v.name: v for v in plan.views}
    assert views["w"].shape == tuple(hi - lo for lo, hi in box)
    assert views["w"].nbytes == kept
    # reads stay inside their buffer; packed buffers are never mapped
    for r in plan.reads:
        b = plan.buffers[r.buffer]
        assert r.dest_offset >= 0 and r.dest_offset + r.nbytes <= b.nbytes
    runs = box_runs(shape, box, item)
    if len(runs) > 1:
        assert not plan.buffers[views["w"].buffer].mappable


@given(shape=shapes, tp=st.integers(2, 4), data=st.data())
@settings(max_examples=100, deadline=None)
def test_span_read_covers_the_runs_and_views_with_the_tensor_strides(
    shape: tuple[int, int], tp: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, tp - 1))
    idx = _index([("w", "bfloat16", shape)])
    box = shard_box(shape, 1, rank, tp)
    runs = box_runs(shape, box, 2)
    plan = plan_shards(idx, {"w": box}, "cpu", chunk_bytes=PAGE, gather=lambda *_: False)
    (view,) = plan.views
    if len(runs) > 1:
        w = idx.tensors["w"]
        lo, hi = w.offset + runs[0][0], w.offset + runs[-1][0] + runs[-1][1]
        assert sorted((r.file_offset, r.file_offset + r.nbytes) for r in plan.reads)[0][0] == lo
        assert plan.read_nbytes == hi - lo
        assert view.strides == (shape[1], 1)
        assert plan.buffers[view.buffer].mappable
    else:
        assert view.strides is None


def test_split_dim_and_shard_box_edges() -> None:
    assert split_dim((4, 6), ((1, 3), (0, 6))) == 0
    assert split_dim((4, 6), ((0, 4), (2, 4))) == 1
    assert shard_box((10, 3), 0, 3, 4) == ((9, 10), (0, 3))  # the last rank keeps what is left
    assert shard_box((2, 3), 0, 3, 4) == ((2, 2), (0, 3))  # nothing left: an empty box
    assert box_runs((2, 3), ((2, 2), (0, 3)), 4) == []
    with pytest.raises(ValueError, match="no shard 4 of 4"):
        shard_box((2, 3), 0, 4, 4)


def test_bad_boxes_and_names_are_refused() -> None:
    idx = _index([("w", "float32", (4, 4))])
    with pytest.raises(ValueError, match="does not lie inside tensor 'w'"):
        plan_shards(idx, {"w": ((0, 5), (0, 4))}, "cpu", chunk_bytes=PAGE)
    with pytest.raises(ValueError, match="does not lie inside"):
        plan_shards(idx, {"w": ((0, 4),)}, "cpu", chunk_bytes=PAGE)
    with pytest.raises(KeyError, match="'nope' is not stored"):
        plan_shards(idx, {"nope": None}, "cpu", chunk_bytes=PAGE)
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_shards(idx, {"w": None}, "cpu", chunk_bytes=100)


def test_gather_rule_prefers_the_span_for_short_runs() -> None:
    # 128-byte halves of 256-byte rows: one read of the span is cheaper
    assert not gather_runs(128, 128 * 128, 256 * 128 - 128)
    # 1 MiB halves of 2 MiB rows, 8 rows: reading only the halves is cheaper
    assert gather_runs(8, 8 << 20, 15 << 20)
    # a device pays a copy per run too
    assert gather_runs(64, 64 * 65536, 127 * 65536) and not gather_runs(
        64, 64 * 65536, 127 * 65536, device=True, gbps=50.0
    )


def test_plan_into_gives_each_tensor_a_buffer_of_exactly_its_bytes() -> None:
    idx = _index([("a", "float32", (3, 5)), ("b", "bfloat16", (7,)), ("e", "float32", (0,))])
    plan = plan_into(idx, ["b", "a", "e"], "cpu", chunk_bytes=PAGE)
    assert [v.name for v in plan.views] == ["b", "a", "e"]
    assert [b.nbytes for b in plan.buffers] == [14, 60, 0]
    assert not any(b.mappable for b in plan.buffers)
    assert plan.read_nbytes == 74


# ------------------------------------------------------------------ through the executor


def _save(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    import torch

    import fastckpt

    g = torch.Generator().manual_seed(3)
    sd = {
        "emb": torch.randn(300, 64, generator=g).to(torch.bfloat16),
        "down": torch.randn(16, 64000, generator=g),  # long rows: runs are gathered
        "o": torch.randn(40, 40, generator=g).to(torch.bfloat16),  # short rows: the span
        "norm": torch.randn(64, generator=g),
        "flag": torch.tensor([True, False, True]),
    }
    path = tmp_path / "ck"
    fastckpt.save(sd, path, metadata=None)
    return path, sd


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_shard_reads_through_the_core_give_the_rank_its_bytes(
    tmp_path: Path, device: str, rank: int
) -> None:
    import torch

    import fastckpt
    from fastckpt.loader.devstage import fake_stage_factory

    path, sd = _save(tmp_path)
    tp = 3
    boxes = {
        "emb": shard_box((300, 64), 0, rank, tp),
        "down": shard_box((16, 64000), 1, rank, tp),
        "o": shard_box((40, 40), 1, rank, tp),
        "norm": None,
        "flag": None,
    }
    loader = fastckpt.Loader(
        device_stage=fake_stage_factory(slot_bytes=1 << 16, slots=4) if device != "cpu" else None,
        ring_slot_bytes=1 << 16,
    )
    stats: list[fastckpt.LoadStats] = []
    with loader:
        got = dict(
            fastckpt.iter_tensors(
                path, device, boxes=boxes, loader=loader, stats=stats, window_bytes=1 << 16
            )
        )
    assert set(got) == set(sd)
    for name, ref in sd.items():
        box = boxes[name]
        want = ref if box is None else ref[tuple(slice(lo, hi) for lo, hi in box)]
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        assert torch.equal(got[name].cpu(), want), name
    read = sum(s.read_nbytes for s in stats)
    kept = sum(s.nbytes for s in stats)
    assert kept == sum(
        got[n].numel() * got[n].element_size() for n in got
    )  # every window reports the bytes it delivered
    # only "o" (40 short rows) is read as its span: everything else is read to the byte
    width = boxes["o"][1][1] - boxes["o"][1][0]
    o_span, o_kept = (39 * 40 + width) * 2, 40 * width * 2
    assert read == kept + o_span - o_kept
    assert len(stats) > 1  # windows


def test_plan_into_fills_the_callers_memory(tmp_path: Path) -> None:
    import torch

    import fastckpt
    from fastckpt.loader.shardplan import plan_into

    path, sd = _save(tmp_path)
    names = ["down", "emb", "flag"]
    params = {n: torch.zeros_like(sd[n]) for n in names}  # type: ignore[arg-type]
    loader = fastckpt.Loader()
    with loader, loader.open_source(path, convert=False) as opened:
        plan = plan_into(opened.index, names, "cpu", chunk_bytes=1 << 20)
        into = {i: params[n].reshape(-1).view(torch.uint8) for i, n in enumerate(names)}
        got, st = loader.execute(opened, "cpu", plan=plan, into=into, tiers=False)
        for n in names:
            assert torch.equal(params[n], sd[n])  # type: ignore[arg-type]
            assert got[n].data_ptr() == params[n].data_ptr()
        assert st.read_nbytes == sum(params[n].numel() * params[n].element_size() for n in names)
        with pytest.raises(ValueError, match="contiguous uint8 tensor of"):
            bad = {0: torch.zeros(3, dtype=torch.uint8)}
            loader.execute(opened, "cpu", plan=plan, into=bad, tiers=False)
        with pytest.raises(ValueError, match="pass its plan, tiers=False"):
            loader.execute(opened, "cpu", plan=plan, into=into)
