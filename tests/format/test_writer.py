"""The writer: layout planning, partition files, aliases, device maps, input validation."""

from __future__ import annotations

import itertools
import json
import os
import struct

import pytest
import torch
from _readback import assert_bitwise_equal, check_partitions, read_back
from hypothesis import given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt.errors import DestinationExistsError, DeviceError, DtypeError
from fastckpt.format import spec, writer
from fastckpt.format.layout import normalize_device_map, plan_layout


def _body(path: str) -> dict:
    with open(os.path.join(path, spec.INDEX_FILE), "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 16)
    return json.loads(data[spec.HEADER_NBYTES : spec.HEADER_NBYTES + n])


# --- plan_layout ----------------------------------------------------------------------------------


def test_plan_layout_packs_and_aligns() -> None:
    layout = plan_layout([10, 300, 0, 5], [None] * 4, partition_bytes=1 << 20, alignment=256)
    assert layout.placements == ((0, 0), (0, 256), (0, 768), (0, 768))
    assert layout.order == (0, 1, 2, 3)
    assert layout.partitions == ((None, 4096),)


def test_plan_layout_size_cap_and_oversized_tensor() -> None:
    layout = plan_layout([100, 100, 5000, 100], [None] * 4, partition_bytes=300, alignment=256)
    # 100 @0, next would end at 356 > 300 -> new partition; 5000 alone; 100 in a fourth.
    assert [p for p, _ in layout.placements] == [0, 1, 2, 3]
    assert [n for _, n in layout.partitions] == [4096, 4096, 8192, 4096]


def test_plan_layout_groups_devices_in_first_appearance_order() -> None:
    devices = ["cuda:1", "cuda:0", "cuda:1", None, "cuda:0"]
    layout = plan_layout([8] * 5, devices, partition_bytes=1 << 20, alignment=256)
    assert [d for d, _ in layout.partitions] == ["cuda:1", "cuda:0", None]
    assert layout.order == (0, 2, 1, 4, 3)
    assert layout.placements[2] == (0, 256)
    assert layout.placements[4] == (1, 256)


def test_plan_layout_empty_tensors_never_open_a_partition() -> None:
    layout = plan_layout([200, 0, 0], [None] * 3, partition_bytes=200, alignment=256)
    assert [p for p, _ in layout.placements] == [0, 0, 0]
    assert plan_layout([], [], partition_bytes=1, alignment=256).partitions == ((None, 0),)


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from([None, "cuda:0", "cuda:1"])),
        max_size=30,
    ),
    cap=st.integers(1, 20_000),
    alignment=st.sampled_from([256, 1024, 8192]),
)
def test_plan_layout_properties(items, cap, alignment) -> None:
    sizes = [n for n, _ in items]
    devices = [d for _, d in items]
    layout = plan_layout(sizes, devices, partition_bytes=cap, alignment=alignment)
    assert sorted(layout.order) == list(range(len(items)))
    # load order is (partition, offset) order and each device's partitions are contiguous
    keys = [layout.placements[i] for i in layout.order]
    assert keys == sorted(keys)
    seen_devices = [layout.partitions[p][0] for p, _ in keys]
    groups = [d for k, d in enumerate(seen_devices) if k == 0 or d != seen_devices[k - 1]]
    assert len(groups) == len(set(groups))
    for p, (dev, nbytes) in enumerate(layout.partitions):
        members = [i for i in range(len(items)) if layout.placements[i][0] == p]
        assert nbytes % spec.PAGE == 0
        assert all(devices[i] == dev for i in members)
        spans = sorted((layout.placements[i][1], sizes[i]) for i in members if sizes[i])
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert a + n <= b  # no overlap
        for i in members:
            off = layout.placements[i][1]
            assert off % alignment == 0 and off + sizes[i] <= nbytes
        data_end = max((o + n for o, n in spans), default=0)
        assert data_end <= cap or len(spans) == 1  # only a lone oversized tensor exceeds the cap


@pytest.mark.parametrize(
    "bad",
    [{1: "cpu"}, {"a": ""}, {"a": None}, {"a": -1}, {"a": True}, ["a"], {"a": 1.5}],
)
def test_normalize_device_map_refuses(bad: object) -> None:
    with pytest.raises(DeviceError):
        normalize_device_map(bad)  # type: ignore[arg-type]


def test_normalize_device_map_ordinals() -> None:
    assert normalize_device_map({"a": 0, "b": " cpu "}) == {"a": "cuda:0", "b": "cpu"}


# --- save ---------------------------------------------------------------------------------------


def test_save_roundtrip_and_index_fields(tmp_path) -> None:
    sd = {
        "w": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int16),
        "s": torch.tensor(2.5, dtype=torch.float64),
        "e": torch.empty(0, 4, dtype=torch.bfloat16),
        "m": torch.tensor([True, False, True]),
    }
    index = fastckpt.save(sd, tmp_path / "ck", metadata={"who": "test"})
    assert index.root == str(tmp_path / "ck")
    assert list(index.tensors) == ["w", "b", "s", "e", "m"]
    assert dict(index.metadata) == {"who": "test"}
    assert index.source["kind"] == "state_dict"
    assert index.source["tool"].startswith("fastckpt ")
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))
    body = _body(str(tmp_path / "ck"))
    assert body["format"] == "fastckpt" and body["version"] == [1, 0]
    assert body["checksum"]["algorithm"] == "crc32c"
    assert sorted(os.listdir(tmp_path / "ck")) == ["fastckpt.index", "part-00000.fckpt"]


def test_tied_weights_stored_once(tmp_path) -> None:
    emb = torch.randn(16, 8)
    sd = {"embed.weight": emb, "other": torch.randn(4), "lm_head.weight": emb}
    index = fastckpt.save(sd, tmp_path / "ck")
    assert list(index.tensors) == ["embed.weight", "other"]
    assert dict(index.aliases) == {"lm_head.weight": "embed.weight"}
    back = read_back(tmp_path / "ck")
    assert back["lm_head.weight"] is back["embed.weight"]
    assert_bitwise_equal(sd, back)


def test_shared_storage_views_are_separate_copies(tmp_path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    sd = {
        "a": base[0:12],
        "b": base[6:18],  # overlaps a
        "c": base.view(4, 6)[:, 1],  # strided view
        "d": base.view(6, 4),  # same storage/offset as a, different shape
        "t": base.view(4, 6).t(),  # non-contiguous
        "same_view": base.view(6, 4),  # the same view as d -> alias
    }
    index = fastckpt.save(sd, tmp_path / "ck")
    assert dict(index.aliases) == {"same_view": "d"}
    assert set(index.tensors) == {"a", "b", "c", "d", "t"}
    assert index.tensors["t"].shape == (6, 4)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_conj_and_neg_views(tmp_path) -> None:
    z = torch.randn(5, dtype=torch.complex64)
    sd = {"z": z, "zc": z.conj(), "neg": torch._neg_view(torch.randn(3))}
    index = fastckpt.save(sd, tmp_path / "ck")
    assert not index.aliases
    back = read_back(tmp_path / "ck")
    assert torch.equal(back["zc"], z.conj().resolve_conj())
    assert_bitwise_equal(sd, back)


def test_requires_grad_and_parameters(tmp_path) -> None:
    lin = torch.nn.Linear(4, 3)
    fastckpt.save(dict(lin.named_parameters()), tmp_path / "ck")
    assert_bitwise_equal(lin.state_dict(), read_back(tmp_path / "ck"))


def test_multi_chunk_checksums(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTCKPT_CHECKSUM_CHUNK_BYTES", "4096")
    monkeypatch.setenv("FASTCKPT_WRITE_BUFFER_BYTES", "5000")  # not a chunk multiple
    sd = {"a": torch.randn(3000), "b": torch.randn(10), "c": torch.randint(0, 9, (7777,))}
    index = fastckpt.save(sd, tmp_path / "ck")
    assert index.checksum_chunk_bytes == 4096
    assert len(index.partitions[0].checksums or ()) == index.partitions[0].nbytes // 4096 > 3
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_partitions_by_size_and_alignment(tmp_path) -> None:
    sd = {f"t{i}": torch.full((100 + i,), i, dtype=torch.int32) for i in range(6)}
    index = fastckpt.save(sd, tmp_path / "ck", partition_bytes=1500, alignment=1024)
    assert index.alignment == 1024
    assert len(index.partitions) == 3
    assert all(t.offset % 1024 == 0 for t in index.tensors.values())
    check_partitions(index)
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_device_map_groups_partitions(tmp_path) -> None:
    sd = {
        "model.embed.weight": torch.randn(4, 4),
        "model.layers.0.w": torch.randn(4),
        "model.layers.1.w": torch.randn(4),
        "model.layers.10.w": torch.randn(4),
        "lm_head.weight": torch.randn(4, 4),
    }
    dmap = {"model.layers.1": "cuda:1", "": "cuda:0"}
    index = fastckpt.save(sd, tmp_path / "ck", device_map=dmap)
    devices = [p.device for p in index.partitions]
    assert devices == ["cuda:0", "cuda:1"]
    on = {n: index.partitions[t.partition].device for n, t in index.tensors.items()}
    assert on["model.layers.1.w"] == "cuda:1"
    assert on["model.layers.10.w"] == "cuda:0"
    # load order: the cuda:0 group first, in state-dict order
    assert list(index.tensors)[:4] == [
        "model.embed.weight",
        "model.layers.0.w",
        "model.layers.10.w",
        "lm_head.weight",
    ]
    assert_bitwise_equal(sd, read_back(tmp_path / "ck"))


def test_empty_state_dict(tmp_path) -> None:
    index = fastckpt.save({}, tmp_path / "ck")
    assert len(index.partitions) == 1 and index.partitions[0].nbytes == 0
    assert read_back(tmp_path / "ck") == {}


def test_progress_counts_every_byte(tmp_path, monkeypatch) -> None:
    seen: list[int] = []
    original = writer.Progress.update

    def spy(self: writer.Progress, n: int) -> None:
        seen.append(n)
        original(self, n)

    monkeypatch.setattr(writer.Progress, "update", spy)
    index = fastckpt.save({"a": torch.randn(5000)}, tmp_path / "ck", progress=True)
    assert sum(seen) == sum(p.nbytes for p in index.partitions)


@pytest.mark.parametrize(
    ("arg", "env", "expected"),
    [
        (True, "never", True),
        (False, "always", False),
        (None, "always", True),
        (None, "never", False),
        (None, "auto", False),  # pytest captures stderr: not a terminal
    ],
)
def test_progress_enabled(monkeypatch, arg, env, expected) -> None:
    monkeypatch.setenv("FASTCKPT_PROGRESS", env)
    assert writer.progress_enabled(arg) is expected


def test_progress_bar_uses_tqdm(monkeypatch) -> None:
    import io

    tqdm = pytest.importorskip("tqdm")
    real = tqdm.tqdm
    bars = []

    def recorder(*args, **kwargs):
        kwargs["file"] = io.StringIO()
        bar = real(*args, **kwargs)
        bars.append(bar)
        return bar

    monkeypatch.setattr(tqdm, "tqdm", recorder)
    bar = writer.Progress(10, enabled=True, desc="x")
    bar.update(4)
    bar.update(6)
    assert bars and bars[0].n == 10 and bar.done == 10
    bar.close()
    assert writer.Progress(10, enabled=False, desc="x")._bar is None


@pytest.mark.parametrize(
    ("sd", "kwargs", "error", "match"),
    [
        ({"a": [1, 2]}, {}, TypeError, "not a torch.Tensor"),
        ({1: torch.zeros(1)}, {}, TypeError, "must be strings"),
        ({"": torch.zeros(1)}, {}, ValueError, "empty"),
        ({"\ud800": torch.zeros(1)}, {}, ValueError, "UTF-8"),
        ({"a": torch.zeros(2, device="meta")}, {}, ValueError, "meta"),
        ({"a": torch.zeros(2, 2).to_sparse()}, {}, ValueError, "layout"),
        ({"a": torch.zeros(1)}, {"alignment": 100}, ValueError, "alignment"),
        ({"a": torch.zeros(1)}, {"alignment": 384}, ValueError, "power of two"),
        ({"a": torch.zeros(1)}, {"partition_bytes": 0}, ValueError, "partition_bytes"),
        ({"a": torch.zeros(1)}, {"partition_bytes": "4G"}, TypeError, "partition_bytes"),
        ({"a": torch.zeros(1)}, {"metadata": {"k": 1}}, TypeError, "metadata"),
        ({"a": torch.zeros(1)}, {"device_map": {"a": ""}}, DeviceError, "empty"),
    ],
)
def test_save_refuses_bad_input(tmp_path, sd, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        fastckpt.save(sd, tmp_path / "ck", **kwargs)
    assert not os.listdir(tmp_path)


def test_save_refuses_non_mapping(tmp_path) -> None:
    with pytest.raises(TypeError, match="mapping"):
        fastckpt.save([torch.zeros(1)], tmp_path / "ck")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtype(tmp_path) -> None:
    with pytest.raises(DtypeError, match="cannot be stored"):
        fastckpt.save({"a": torch.zeros(2, dtype=torch.complex32)}, tmp_path / "ck")


def test_existing_destination_refused_before_work(tmp_path, monkeypatch) -> None:
    fastckpt.save({"a": torch.zeros(1)}, tmp_path / "ck")
    called = []
    monkeypatch.setattr(writer, "_write_partitions", lambda *a, **k: called.append(1))
    with pytest.raises(DestinationExistsError):
        fastckpt.save({"a": torch.ones(1)}, tmp_path / "ck")
    assert not called
