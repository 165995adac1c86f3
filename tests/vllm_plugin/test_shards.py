"""What a tensor-parallel rank reads, learned from the model's own weight loaders
(``integrations.vllm.shards``), without vLLM: a small model whose parameters and weight loaders
behave as vLLM's do (``output_dim``/``input_dim`` on the parameter, the loader narrowing the
checkpoint tensor by the rank: column, row, fused QKV with replicated KV heads, a padded
vocabulary, replicated norms, a tensor nothing uses). The probe pass must find the rank's box of
each tensor, and the real pass (the weight source reading only those boxes) must fill the
parameters exactly as feeding the whole tensors does, reading only the bytes kept."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastckpt
from fastckpt.integrations.vllm.options import VllmLoadOptions
from fastckpt.integrations.vllm.shards import SKIP, learn_boxes, per_stored
from fastckpt.integrations.vllm.weights import iter_weights, storage_order
from fastckpt.loader.shardplan import shard_box

# --------------------------------------------------------------------- a vLLM-like model


def _param(shape: tuple[int, ...], output_dim: int | None, input_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False)
    if output_dim is not None:
        p.output_dim = output_dim  # type: ignore[attr-defined]
    if input_dim is not None:
        p.input_dim = input_dim  # type: ignore[attr-defined]
    return p


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """vLLM's default_weight_loader: the whole tensor, no slicing."""
    assert param.size() == loaded.size(), f"{param.size()} != {loaded.size()}"
    param.data.copy_(loaded)


class Column(nn.Module):
    """ColumnParallelLinear: this rank keeps rows [rank*n, (rank+1)*n) (output_dim 0)."""

    def __init__(self, out_f: int, in_f: int, rank: int, tp: int) -> None:
        super().__init__()
        self.rank = rank
        self.weight = _param((out_f // tp, in_f), 0, 1)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = param.data.shape[param.output_dim]  # type: ignore[attr-defined]
        loaded = loaded.narrow(param.output_dim, self.rank * n, n)  # type: ignore[attr-defined]
        assert param.data.shape == loaded.shape
        param.data.copy_(loaded)


class Row(nn.Module):
    """RowParallelLinear: this rank keeps columns [rank*n, (rank+1)*n) (input_dim 1)."""

    def __init__(self, out_f: int, in_f: int, rank: int, tp: int) -> None:
        super().__init__()
        self.rank = rank
        self.weight = _param((out_f, in_f // tp), 0, 1)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = param.data.shape[param.input_dim]  # type: ignore[attr-defined]
        loaded = loaded.narrow(param.input_dim, self.rank * n, n)  # type: ignore[attr-defined]
        param.data.copy_(loaded)


class QKV(nn.Module):
    """QKVParallelLinear: q, k, v stacked in one parameter; KV heads replicated when the TP size
    exceeds their count (then ranks share a KV head)."""

    def __init__(self, hidden: int, head: int, heads: int, kv_heads: int, rank: int, tp: int):
        super().__init__()
        self.head, self.rank, self.tp = head, rank, tp
        self.q_heads = heads // tp
        self.kv_heads = max(1, kv_heads // tp)
        self.replicas = max(1, tp // kv_heads)
        rows = (self.q_heads + 2 * self.kv_heads) * head
        self.weight = _param((rows, hidden), 0, 1)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        q, kv = self.q_heads * self.head, self.kv_heads * self.head
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        shard_rank = self.rank if shard == "q" else self.rank // self.replicas
        dst = param.data.narrow(0, offset, size)
        loaded = loaded.narrow(0, shard_rank * size, size)
        assert dst.shape == loaded.shape, (dst.shape, loaded.shape)
        dst.copy_(loaded)


class Vocab(nn.Module):
    """VocabParallelEmbedding: rows of the vocabulary padded to a multiple of the TP size; the
    padding rows are zeroed."""

    def __init__(self, vocab: int, hidden: int, rank: int, tp: int) -> None:
        super().__init__()
        self.vocab, self.rank = vocab, rank
        self.per = -(-vocab // tp)
        self.weight = _param((self.per, hidden), 0, None)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        start = self.rank * self.per
        n = max(0, min(self.per, self.vocab - start))
        loaded = loaded.narrow(0, start, n)
        param[: loaded.shape[0]].data.copy_(loaded)
        param[loaded.shape[0] :].data.fill_(0)


class Tiny(nn.Module):
    """Shapes of a small Llama; ``load_weights`` as vLLM's (stacked params mapping, weight
    loaders, default loader, skipped names, returns the names filled)."""

    def __init__(self, rank: int, tp: int, *, transpose_o: bool = False) -> None:
        super().__init__()
        hidden, head, heads, kv, inter, vocab = 64, 16, 4, 1, 96, 203
        self.embed = Vocab(vocab, hidden, rank, tp)
        self.qkv = QKV(hidden, head, heads, kv, rank, tp)
        self.o = Row(hidden, heads * head, rank, tp)
        self.up = Column(inter, hidden, rank, tp)
        self.down = Row(hidden, inter, rank, tp)
        self.norm = nn.Module()
        self.norm.weight = _param((hidden,), None, None)
        self.transpose_o = transpose_o

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stacked = [("qkv.weight", "q.weight", "q"), ("qkv.weight", "k.weight", "k")]
        stacked.append(("qkv.weight", "v.weight", "v"))
        params = dict(self.named_parameters())
        done: set[str] = set()
        for name, w in weights:
            if "inv_freq" in name:
                continue
            for param_name, part, shard in stacked:
                if name == part:
                    p = params[param_name]
                    p.weight_loader(p, w, shard)  # type: ignore[attr-defined]
                    done.add(param_name)
                    break
            else:
                p = params[name]
                if name == "o.weight" and self.transpose_o:
                    w = w.t().contiguous().t()  # a transform the probe cannot follow
                getattr(p, "weight_loader", default_weight_loader)(p, w)
                done.add(name)
        return done


def _checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    return {
        "embed.weight": r(203, 64),
        "q.weight": r(64, 64),
        "k.weight": r(16, 64),
        "v.weight": r(16, 64),
        "o.weight": r(64, 64),
        "up.weight": r(96, 64),
        "down.weight": r(64, 96),
        "norm.weight": r(64),
        "rotary.inv_freq": r(8),
    }


def _entries(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]


# --------------------------------------------------------------------------- probe pass


@pytest.mark.parametrize("tp", [2, 4])
def test_probe_finds_each_ranks_box_from_the_parameter_metadata(tp: int) -> None:
    sd = _checkpoint()
    for rank in range(tp):
        model = Tiny(rank, tp)
        before = {n: p.clone() for n, p in model.named_parameters()}
        got = learn_boxes(model.load_weights, _entries(sd), model.named_parameters())
        per = -(-203 // tp)
        assert got == {
            "embed.weight": ((rank * per, min(203, (rank + 1) * per)), (0, 64)),
            "q.weight": shard_box((64, 64), 0, rank, tp),
            "k.weight": None,  # one KV head, replicated on every rank: read whole
            "v.weight": None,
            "o.weight": shard_box((64, 64), 1, rank, tp),
            "up.weight": shard_box((96, 64), 0, rank, tp),
            "down.weight": shard_box((64, 96), 1, rank, tp),
            "norm.weight": None,  # replicated: read whole by every rank
            "rotary.inv_freq": SKIP,  # nothing copied from it: not read
        }, rank
        # nothing was written into the model by the probe (the vocabulary padding is zeroed by
        # the loader itself, as it will be again in the real pass)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n


def test_a_transform_the_probe_cannot_follow_reads_the_whole_tensor() -> None:
    sd = _checkpoint()
    model = Tiny(1, 2, transpose_o=True)
    got = learn_boxes(model.load_weights, _entries(sd), model.named_parameters())
    assert got["o.weight"] is None
    assert got["down.weight"] == shard_box((64, 96), 1, 1, 2)


def test_a_loader_that_needs_values_reads_that_tensor_whole_and_the_rest_continue() -> None:
    sd = _checkpoint()
    model = Tiny(0, 2)
    inner = model.load_weights

    def load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def peek() -> Any:
            for name, w in weights:
                if name == "up.weight":
                    float(w.sum())  # needs the values
                yield name, w

        return inner(peek())

    got = learn_boxes(load_weights, _entries(sd), model.named_parameters())
    assert got["up.weight"] is None
    assert got["down.weight"] == shard_box((64, 96), 1, 0, 2)
    assert got["q.weight"] == shard_box((64, 64), 0, 0, 2)


def test_tied_names_merge_into_one_box_per_stored_tensor() -> None:
    a, b = ((0, 4), (0, 8)), ((2, 6), (0, 8))
    assert per_stored({"x": a, "y": b}, {"x": "s", "y": "s"}) == {"s": ((0, 6), (0, 8))}
    assert per_stored({"x": a, "y": None}, {"x": "s", "y": "s"}) == {"s": None}
    assert per_stored({"x": SKIP, "y": a}, {"x": "s", "y": "s"}) == {"s": a}
    assert per_stored({"x": SKIP, "y": SKIP}, {"x": "s", "y": "s"}) == {"s": SKIP}


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    tp=st.integers(1, 4),
    column=st.booleans(),
    data=st.data(),
)
def test_probe_box_is_the_ranks_share_for_any_shape(
    rows: int, cols: int, tp: int, column: bool, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, tp - 1))
    rows_, cols_ = (rows * tp, cols) if column else (rows, cols * tp)
    layer = (Column if column else Row)(rows_, cols_, rank, tp)

    def load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for _, w in weights:
            layer.weight.weight_loader(layer.weight, w)  # type: ignore[operator]
        return {"weight"}

    got = learn_boxes(
        load_weights, [("w", (rows_, cols_), torch.bfloat16)], layer.named_parameters()
    )
    want = shard_box((rows_, cols_), 0 if column else 1, rank, tp)
    assert got["w"] == (None if tp == 1 else want)


# --------------------------------------------------------------------------- real pass


def _save(tmp_path: Path, sd: dict[str, torch.Tensor], kind: str) -> Path:
    path = tmp_path / kind
    if kind == "fastckpt":
        fastckpt.save(sd, path, metadata=None)
    else:
        from safetensors.torch import save_file

        path.mkdir()
        save_file(sd, str(path / "model.safetensors"))
    return path


def _fill(
    path: Path, rank: int, tp: int, *, sharded: bool, loader: Any, device: str = "cpu"
) -> tuple[Tiny, list[fastckpt.LoadStats]]:
    from fastckpt.format import dtypes
    from fastckpt.format.reader import read_index

    model = Tiny(rank, tp)
    index = read_index(str(path))
    boxes = None
    if sharded:
        order = storage_order(index)
        entries = [
            (n, index.tensors[s].shape, dtypes.torch_dtype(index.tensors[s].dtype))
            for n, s in order
        ]
        answers = learn_boxes(model.load_weights, entries, model.named_parameters())
        boxes = per_stored(answers, dict(order))
    stats: list[fastckpt.LoadStats] = []
    weights = iter_weights(
        str(path), VllmLoadOptions(), device=device, boxes=boxes, loader=loader, stats=stats
    )

    def to_cpu() -> Iterable[tuple[str, torch.Tensor]]:
        # the fake device's tensors are host memory already; a real GPU's stay on the device
        yield from weights

    done = model.load_weights(to_cpu())
    assert done == {n for n, _ in model.named_parameters()}
    return model, stats


@pytest.mark.parametrize("kind", ["fastckpt", "safetensors"])
@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_real_pass_fills_what_whole_tensors_fill_reading_only_the_kept_bytes(
    tmp_path: Path, kind: str, device: str
) -> None:
    from fastckpt.loader.devstage import fake_stage_factory

    sd = _checkpoint()
    path = _save(tmp_path, sd, kind)
    tp = 2
    stage = fake_stage_factory(slot_bytes=1 << 12, slots=4) if device != "cpu" else None
    with fastckpt.Loader(device_stage=stage, ring_slot_bytes=1 << 12) as loader:
        for rank in range(tp):
            ref, _ = _fill(path, rank, tp, sharded=False, loader=loader, device=device)
            got, stats = _fill(path, rank, tp, sharded=True, loader=loader, device=device)
            for (n, a), (_, b) in zip(ref.named_parameters(), got.named_parameters(), strict=True):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (rank, n)
            read = sum(s.read_nbytes for s in stats)
            item = 2
            per = -(-203 // tp)
            kept_rows = min(203, (rank + 1) * per) - rank * per
            kept = item * (
                kept_rows * 64  # embedding rows
                + 32 * 64  # q rows
                + 16 * 64 * 2  # k, v: one KV head, replicated
                + 64 * 32  # o: half of every row
                + 48 * 64  # up rows
                + 64 * 48  # down: half of every row
                + 64  # norm, replicated
            )
            # the row-sharded (column-parallel) tensors are read to the byte; the two row-
            # parallel ones are short rows (32 or 48 elements), where the policy may read the
            # span they lie in instead: at most one tensor's worth more each
            assert kept <= read <= kept + item * (64 * 32 + 64 * 48), (rank, read, kept)
            assert sum(s.nbytes for s in stats) == kept
            whole = sum(t.numel() * t.element_size() for t in sd.values())
            assert read < whole


def test_a_stand_in_used_in_an_unforeseen_way_reads_the_whole_tensor(tmp_path: Path) -> None:
    """Probe on one model, real pass on a model whose loader differs: the values are still
    right (the whole tensor is read then), never wrong weights."""
    sd = _checkpoint()
    path = _save(tmp_path, sd, "fastckpt")
    from fastckpt.format import dtypes
    from fastckpt.format.reader import read_index

    index = read_index(str(path))
    order = storage_order(index)
    entries = [
        (n, index.tensors[s].shape, dtypes.torch_dtype(index.tensors[s].dtype)) for n, s in order
    ]
    probe = Tiny(1, 2)
    boxes = per_stored(
        learn_boxes(probe.load_weights, entries, probe.named_parameters()), dict(order)
    )
    model = Tiny(1, 2, transpose_o=True)
    with fastckpt.Loader() as loader:
        model.load_weights(iter_weights(str(path), VllmLoadOptions(), boxes=boxes, loader=loader))
        ref, _ = _fill(path, 1, 2, sharded=False, loader=loader)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), n
