"""Which bytes of each checkpoint tensor a tensor-parallel rank keeps, learned from vLLM itself.

vLLM shards a model by giving each rank's parameters a share of every tensor: a parameter's
``weight_loader`` narrows the checkpoint tensor along the parameter's ``output_dim`` (column
parallel: rows ``[r*n, (r+1)*n)``, one range of the file) or ``input_dim`` (row parallel: a
segment of every row) at an offset made from the rank, and copies that into the parameter. The
layout lives in that code (fused QKV with replicated KV heads, padded vocabularies, merged
gate/up), not in a table of names. So it is observed, not re-derived:

1. **Probe pass** (``learn_boxes``): the model's own ``load_weights`` runs once on stand-ins
   (``Lazy`` tensors on the meta device: the checkpoint's names, shapes and dtypes, no bytes).
   Each ``narrow`` on a stand-in is tracked as a box of the original tensor; a copy of a
   stand-in into a parameter is recorded instead of run (nothing is written). A tensor's box is
   the bounding box of what was copied from it, kept only when every narrowed dimension is the
   receiving parameter's ``output_dim`` or ``input_dim``; anything else (a reshape, a transpose,
   a dtype change, a value read, a copy into something that is not a parameter) means the whole
   tensor is read. A tensor nothing was copied from is not read at all.
2. **Real pass**: the weight source reads only the boxes (``fastckpt.iter_tensors(boxes=...)``)
   and hands ``load_weights`` a ``Lazy`` holding the box's bytes; the same ``narrow`` calls now
   return plain tensors over those bytes, so vLLM's loaders copy exactly what they would have
   copied from the whole tensor. Should a loader use a stand-in in a way the probe did not see,
   the whole tensor is read then (``fetch``), never a wrong value.

Only torch is imported here: the rules are tested without vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt.loader.shardplan import Box, whole_box

SKIP = "skip"
"""``learn_boxes``' answer for a tensor nothing was copied from: it need not be read."""

# Ops that keep a stand-in's box: the same elements, the same layout.
_SAME_ELEMENTS = {torch.Tensor.detach, torch.Tensor.contiguous, torch.detach}
_NARROW = {torch.Tensor.narrow, torch.narrow}
# Ops that write their other tensor arguments into their first one.
_COPIES = {torch.Tensor.copy_, torch.Tensor.__setitem__}


@dataclass
class _Record:
    """What the probe pass saw of one checkpoint tensor."""

    name: str
    shape: tuple[int, ...]
    boxes: list[Box] = field(default_factory=list)
    dests: list[torch.Tensor] = field(default_factory=list)  # where each box was copied to
    whole: bool = False
    why: str = ""

    def need_whole(self, why: str) -> None:
        if not self.whole:
            self.whole, self.why = True, why


@dataclass
class _Held:
    """A real-pass stand-in's source: the box read, its bytes, and how to read the whole."""

    name: str
    shape: tuple[int, ...]
    box: Box | None  # None: nothing was read
    data: torch.Tensor | None
    fetch: Callable[[str], torch.Tensor]
    whole: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self.whole is None:
            self.whole = self.fetch(self.name)
        return self.whole


class Lazy(torch.Tensor):
    """A checkpoint tensor vLLM's loaders see: full shape and dtype on the meta device, plus the
    box of the original it stands for (``narrow`` composes it). In the probe pass it records
    copies (``_record``); in the real pass it holds a box's bytes (``_held``)."""

    _box: Box | None
    _record: list[_Record]
    _held: _Held | None

    @staticmethod
    def make(
        meta: torch.Tensor, box: Box | None, record: list[_Record], held: _Held | None
    ) -> Lazy:
        out = meta.as_subclass(Lazy)
        out._box, out._record, out._held = box, record, held
        return out

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        mine = [a for a in _flat(args, kwargs) if isinstance(a, Lazy)]
        held = next((m._held for m in mine if m._held is not None), None)
        if held is not None:
            return _real(func, args, kwargs, mine)
        return _probe(func, args, kwargs, mine)


def _flat(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _plain(value: Any, lazy_to: Callable[[Lazy], Any]) -> Any:
    if isinstance(value, Lazy):
        return lazy_to(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, lazy_to) for v in value)
    return value


def _meta(t: Lazy) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def _run_meta(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*_plain(args, _meta), **{k: _plain(v, _meta) for k, v in kwargs.items()})


def _narrowed(t: Lazy, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Box | None:
    """The box of ``t.narrow(dim, start, length)`` in the original tensor's coordinates."""
    if t._box is None:
        return None
    rest = list(args[1:]) + [kwargs[k] for k in ("dim", "start", "length") if k in kwargs]
    dim, start, length = (int(x) for x in rest[:3])
    dim %= t.dim()
    lo = t._box[dim][0] + start
    return tuple((lo, lo + length) if d == dim else r for d, r in enumerate(t._box))


# ------------------------------------------------------------------------- probe pass


def _probe(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mine: list[Lazy]) -> Any:
    records = [r for m in mine for r in m._record]
    if func in _NARROW and isinstance(args[0], Lazy):
        out = _run_meta(func, args, kwargs)
        return Lazy.make(out, _narrowed(args[0], args, kwargs), records, None)
    if func in _COPIES and not isinstance(args[0], Lazy):
        dest = args[0]
        for m in mine:
            for r in m._record:
                if m._box is None or len(m._record) > 1:
                    r.need_whole(f"{func.__name__} of a transformed tensor")
                else:
                    r.boxes.append(m._box)
                    r.dests.append(dest)
        return dest if func is torch.Tensor.copy_ else None
    try:
        out = _run_meta(func, args, kwargs)
    except Exception:
        for r in records:
            r.need_whole(f"{getattr(func, '__name__', func)} needs its values")
        raise
    if not isinstance(out, torch.Tensor):
        return out  # shape, dtype, dim(): what the meta tensor knows
    if func in _SAME_ELEMENTS and len(mine) == 1 and args and args[0] is mine[0]:
        return Lazy.make(out, mine[0]._box, records, None)
    for r in records:
        r.need_whole(f"{getattr(func, '__name__', func)} changes the tensor")
    return Lazy.make(out, None, records, None)


def learn_boxes(
    load_weights: Callable[[Iterable[tuple[str, torch.Tensor]]], Any],
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    params: Iterable[tuple[str, torch.nn.Parameter]],
) -> dict[str, Box | str | None]:
    """Run ``load_weights`` on stand-ins of ``tensors`` ((name, shape, dtype) of the checkpoint,
    in the order the real pass will feed them) and say, per name, what the model keeps of it: a
    ``Box`` (read only that), ``None`` (read it whole) or ``SKIP`` (nothing was copied from it).

    ``params`` are the model's parameters (``named_parameters()``): a copy into one of them
    keeps its box only when each narrowed dimension is that parameter's ``output_dim`` or
    ``input_dim``. Nothing is written into the model. A ``load_weights`` that fails on a
    stand-in (it needed values) is run again on the tensors after that one; the failing one is
    read whole.
    """
    by_storage: dict[int, torch.nn.Parameter] = {}
    for _, p in params:
        if p.device.type != "meta" and p.numel():
            by_storage[p.untyped_storage().data_ptr()] = p
    todo = list(tensors)
    records = {name: _Record(name, tuple(shape)) for name, shape, _ in todo}
    while todo:
        fed: list[str] = []
        try:
            load_weights(_stand_ins(todo, records, fed))
            todo = []
        except Exception as exc:
            failed = fed[-1] if fed else todo[0][0]
            records[failed].need_whole(f"load_weights failed on its stand-in: {exc!r}"[:300])
            todo = todo[len(fed) :] if fed else todo[1:]
    out = {name: _decide(rec, by_storage) for name, rec in records.items()}
    for rec in records.values():
        rec.dests.clear()
    return out


def _stand_ins(
    batch: list[tuple[str, tuple[int, ...], torch.dtype]],
    records: Mapping[str, _Record],
    fed: list[str],
) -> Iterator[tuple[str, Lazy]]:
    for name, shape, dtype in batch:
        fed.append(name)
        meta = torch.empty(tuple(shape), dtype=dtype, device="meta")
        yield name, Lazy.make(meta, whole_box(tuple(shape)), [records[name]], None)


def _decide(rec: _Record, by_storage: Mapping[int, torch.nn.Parameter]) -> Box | str | None:
    if rec.whole:
        return None
    if not rec.boxes:
        return SKIP
    full = whole_box(rec.shape)
    for box, dest in zip(rec.boxes, rec.dests, strict=True):
        narrowed = {d for d, r in enumerate(box) if r != full[d]}
        if not narrowed:
            continue
        param = by_storage.get(dest.untyped_storage().data_ptr()) if dest.numel() else None
        if param is None:
            return None  # copied into something that is not a parameter's memory
        dims = {getattr(param, "output_dim", None), getattr(param, "input_dim", None)}
        if not narrowed <= dims - {None}:
            return None
    lo = [min(b[d][0] for b in rec.boxes) for d in range(len(rec.shape))]
    hi = [max(b[d][1] for b in rec.boxes) for d in range(len(rec.shape))]
    box = tuple(zip(lo, hi, strict=True))
    return None if box == full else box


# -------------------------------------------------------------------------- real pass


def stand_in(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    box: Box | None,
    data: torch.Tensor | None,
    fetch: Callable[[str], torch.Tensor],
) -> Lazy:
    """The real pass's tensor for checkpoint tensor ``name``: ``data`` is its ``box`` (read by the
    weight source; both None for a tensor that was not read); ``fetch(name)`` reads the whole
    tensor should a loader need more."""
    meta = torch.empty(tuple(shape), dtype=dtype, device="meta")
    held = _Held(name, tuple(shape), box, data, fetch)
    return Lazy.make(meta, whole_box(tuple(shape)), [], held)


def _real(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mine: list[Lazy]) -> Any:
    if func in _NARROW and isinstance(args[0], Lazy) and len(mine) == 1:
        t = args[0]
        held = t._held
        assert held is not None
        box = _narrowed(t, args, kwargs)
        if (
            box is not None
            and held.box is not None
            and held.data is not None
            and _inside(box, held.box)
        ):
            view = held.data
            for d, ((lo, hi), (base, _)) in enumerate(zip(box, held.box, strict=True)):
                if (lo - base, hi - lo) != (0, view.shape[d]):
                    view = view.narrow(d, lo - base, hi - lo)
            return view
        out = _run_meta(func, args, kwargs)
        return Lazy.make(out, box, [], held)
    if func not in _COPIES and func not in _NARROW:
        try:
            out = _run_meta(func, args, kwargs)
        except Exception:
            out = None
        else:
            if not isinstance(out, torch.Tensor):
                return out  # what the meta tensor knows: shape, dtype, dim()
            if func in _SAME_ELEMENTS and len(mine) == 1 and args and args[0] is mine[0]:
                return Lazy.make(out, mine[0]._box, [], mine[0]._held)
    # anything else needs the values: the whole tensor, read now, cut to the stand-in's box
    if (
        getattr(func, "__name__", "").endswith("_")
        and args
        and isinstance(args[0], Lazy)
        and func is not torch.Tensor.copy_
    ):
        name = args[0]._held.name if args[0]._held is not None else "?"
        raise RuntimeError(
            f"fastckpt: vLLM's loader changed checkpoint tensor {name!r} in place "
            f"({func.__name__}), which the shard probe did not see; load without sharded reads"
        )

    def values(t: Lazy) -> torch.Tensor:
        assert t._held is not None
        whole = t._held.materialize()
        if t._box is None:
            raise RuntimeError(f"fastckpt: lost track of tensor {t._held.name!r}")
        return whole[tuple(slice(lo, hi) for lo, hi in t._box)]

    return func(*_plain(args, values), **{k: _plain(v, values) for k, v in kwargs.items()})


def _inside(box: Box, outer: Box) -> bool:
    return all(o_lo <= lo and hi <= o_hi for (lo, hi), (o_lo, o_hi) in zip(box, outer, strict=True))


def per_stored(
    answers: Mapping[str, Box | str | None], stored_of: Mapping[str, str]
) -> dict[str, Box | str | None]:
    """``learn_boxes``' answers per name merged per stored tensor (a tied weight is one tensor
    under two names): the bounding box of what the names keep; whole if any name needs it whole;
    ``SKIP`` only if every name was skipped."""
    out: dict[str, Box | str | None] = {}
    for name, answer in answers.items():
        stored = stored_of[name]
        if stored not in out:
            out[stored] = answer
            continue
        prev = out[stored]
        if prev is None or answer is None:
            out[stored] = None
        elif prev == SKIP:
            out[stored] = answer
        elif answer != SKIP:
            assert isinstance(prev, tuple) and isinstance(answer, tuple)
            out[stored] = tuple(
                (min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(prev, answer, strict=True)
            )
    return out
