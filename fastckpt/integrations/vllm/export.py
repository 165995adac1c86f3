"""Per-rank exports: each tensor-parallel rank's weights as vLLM holds them, loaded straight into
the parameters. Imports no vLLM (``export_model`` imports it when run), so the rules are tested
without vLLM.

``fastckpt vllm-export MODEL OUT --tensor-parallel-size N`` runs vLLM once with load format
``fastckpt`` and the option ``export_dir``: in every worker, after the model's ``load_weights``
filled the parameters and before vLLM post-processes them (quantization repacking, kernel
layouts), the rank's state (``state_dict``: parameters and persistent buffers, tied ones stored
once) is saved as a fastckpt checkpoint of its own. The folder::

    OUT/
      fastckpt-vllm-export.json     what it was made for, its ranks, its source (written last)
      config.json, tokenizer...     carried from MODEL, so vLLM can build the model from OUT
      tp2-pp1/rank-pp0-tp0/         one fastckpt checkpoint per rank (its index records the same
      tp2-pp1/rank-pp0-tp1/         "made for" and the rank)

``vllm serve OUT --load-format fastckpt`` (same TP/PP sizes, dtype, quantization, vLLM release)
then reads, in each worker, only that rank's checkpoint into the parameters' own memory
(``shardplan.plan_into`` + ``Loader.execute(into=...)``: no ``load_weights``, no slicing, no extra
copy on the device; on a GPU through the pinned staging ring), and vLLM post-processes as
usual. Anything else is refused with ``CheckpointMismatchError`` saying what differs and the
command that exports again; never a silent fallback, never wrong weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from fastckpt.integrations.vllm.weights import CheckpointMismatchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.integrations.vllm.options import VllmLoadOptions
    from fastckpt.loader.session import Loader
    from fastckpt.loader.stats import LoadStats

MANIFEST = "fastckpt-vllm-export.json"
META_KEY = "fastckpt.vllm_export"
FORMAT = "fastckpt-vllm-export"
VERSION = 1


@dataclass(frozen=True)
class Target:
    """What a per-rank export is made for, and what an engine runs: the same fields, compared
    one by one."""

    architecture: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    dtype: str
    quantization: str | None
    quantization_config: str | None  # the checkpoint's quantization config, canonical JSON
    vllm: str  # vLLM's release (major.minor.patch): parameter layouts may change between them

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Target:
        names = {f.name for f in fields(Target)}
        if not isinstance(d, Mapping) or set(d) != names:
            raise ValueError(f"not an export target: {d!r}")
        return Target(**{k: d[k] for k in names})

    def describe(self) -> str:
        q = self.quantization or "no quantization"
        return (
            f"{self.architecture}, tensor-parallel size {self.tensor_parallel_size}, "
            f"pipeline-parallel size {self.pipeline_parallel_size}, {self.dtype}, {q}, "
            f"vLLM {self.vllm}"
        )


_LABELS = {
    "architecture": "architecture",
    "tensor_parallel_size": "tensor-parallel size",
    "pipeline_parallel_size": "pipeline-parallel size",
    "dtype": "dtype",
    "quantization": "quantization",
    "quantization_config": "quantization config",
    "vllm": "vLLM release",
}


def vllm_release(version: str) -> str:
    """The release part of a vLLM version: ``0.32.0+cpu`` -> ``0.32.0``."""
    m = re.match(r"\d+(\.\d+)*", version)
    return m.group(0) if m else version


def canonical_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def rank_dir(target: Target, tp_rank: int, pp_rank: int) -> str:
    """The rank's checkpoint folder inside an export (relative)."""
    return (
        f"tp{target.tensor_parallel_size}-pp{target.pipeline_parallel_size}/"
        f"rank-pp{pp_rank}-tp{tp_rank}"
    )


def differences(made: Target, running: Target) -> list[str]:
    """Each field that differs, as ``"<label> <made> (this engine: <running>)"``."""
    out = []
    for f in fields(Target):
        a, b = getattr(made, f.name), getattr(running, f.name)
        if a != b:
            out.append(
                f"{_LABELS[f.name]} {a if a is not None else 'none'} (this engine: "
                f"{b if b is not None else 'none'})"
            )
    return out


def export_command(source: str, running: Target, out: str = "NEW_DIR") -> str:
    """The command that exports ``source`` for an engine running ``running``."""
    cmd = (
        f"fastckpt vllm-export {source} {out} --tensor-parallel-size {running.tensor_parallel_size}"
    )
    if running.pipeline_parallel_size != 1:
        cmd += f" --pipeline-parallel-size {running.pipeline_parallel_size}"
    cmd += f" --dtype {running.dtype}"
    if running.quantization:
        cmd += f" --quantization {running.quantization}"
    return cmd


def refusal(path: str, made: Target, running: Target, source: str) -> str:
    diffs = differences(made, running)
    return (
        f"{path} is a per-rank export made for {made.describe()}; this engine runs "
        f"{running.describe()}. It differs in: {'; '.join(diffs)}. Its weights are laid out for "
        f"the engine it was made for, so it is not loaded. Export again for this engine "
        f"(with vLLM {running.vllm}): {export_command(source, running)}"
    )


def read_manifest(path: str) -> dict[str, Any] | None:
    """The export manifest of the folder ``path``, or None when it is not a per-rank export."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            raw = fh.read(1 << 20)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"version {manifest.get('version')!r}; this fastckpt reads version {VERSION}"
            )
        Target.from_dict(manifest["made_for"])
        if not isinstance(manifest.get("ranks"), list) or not isinstance(
            manifest.get("source"), str
        ):
            raise ValueError("ranks or source missing")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointMismatchError(
            f"{os.path.join(path, MANIFEST)} is not a valid fastckpt vLLM export manifest "
            f"({exc}); export again with fastckpt vllm-export"
        ) from None
    out: dict[str, Any] = manifest
    return out


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


# --------------------------------------------------------------------------- writing


def snapshot(
    state: Mapping[str, torch.Tensor],
    export_dir: str,
    target: Target,
    tp_rank: int,
    pp_rank: int,
) -> str:
    """Save one rank's ``state`` (the model's ``state_dict(keep_vars=True)`` before vLLM's
    post-processing) into ``export_dir`` as a fastckpt checkpoint; returns its path."""
    import torch

    from fastckpt.format.writer import save

    plain = {
        name: t.detach()
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }
    missing = sorted(n for n, t in state.items() if n not in plain)
    if missing:
        raise CheckpointMismatchError(
            f"cannot export: parameter(s) {', '.join(missing[:8])} hold no data yet when the "
            "weights are loaded (this quantization method quantizes while loading); such models "
            "cannot be exported per rank"
        )
    out = os.path.join(export_dir, rank_dir(target, tp_rank, pp_rank))
    meta = {
        META_KEY: json.dumps(
            {"made_for": asdict(target), "tp_rank": tp_rank, "pp_rank": pp_rank}, sort_keys=True
        )
    }
    save(plain, out, metadata=meta)
    return out


def publish(
    staging: str, source: str, ranks: Sequence[str], target: Target, carried_from: str
) -> None:
    """Finish an export in ``staging``: check that every rank wrote its checkpoint for
    ``target``, copy the carried files (config, tokenizer) of ``carried_from``, and write the
    manifest last."""
    from fastckpt.errors import SourceError
    from fastckpt.format.atomic import fsync_path
    from fastckpt.format.fsdir import CheckpointDir
    from fastckpt.format.reader import read_index

    for rel in ranks:
        index = read_index(os.path.join(staging, rel))
        meta = json.loads(index.metadata.get(META_KEY, "null") or "null")
        if not isinstance(meta, dict) or Target.from_dict(meta["made_for"]) != target:
            raise RuntimeError(f"rank checkpoint {rel} was not written for {target.describe()}")
    # the files the checkpoint carries (config, tokenizer), opened beneath its folder
    carried = read_index(carried_from)
    with CheckpointDir(carried_from) as d:
        for name in (*carried.files, *carried.tree):
            f = d.open(name, error=SourceError, what="carried file")
            try:
                dst = os.path.join(staging, *name.split("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as out:
                    while chunk := os.read(f.fd, 1 << 20):
                        out.write(chunk)
                fsync_path(dst)
            finally:
                f.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "made_for": asdict(target),
        "ranks": list(ranks),
        "source": source,
    }
    path = os.path.join(staging, MANIFEST)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    fsync_path(path)


# --------------------------------------------------------------------------- loading


def fill(
    state: Mapping[str, torch.Tensor],
    path: str,
    running: Target,
    tp_rank: int,
    pp_rank: int,
    *,
    options: VllmLoadOptions,
    device: str,
    loader: Loader,
) -> LoadStats:
    """Fill ``state`` (the model's ``state_dict(keep_vars=True)``) from the export at ``path``:
    checks (made for this engine, this rank's checkpoint, every name, shape and dtype), then one
    ``Loader.execute`` reading every tensor into its parameter's memory. Returns its stats."""
    import torch

    from fastckpt.format import dtypes
    from fastckpt.format.reader import read_index

    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointMismatchError(f"{path} is not a per-rank export ({MANIFEST} missing)")
    made = Target.from_dict(manifest["made_for"])
    source = manifest["source"]
    if made != running:
        raise CheckpointMismatchError(refusal(path, made, running, source))
    rel = rank_dir(made, tp_rank, pp_rank)
    if rel not in manifest["ranks"]:
        raise CheckpointMismatchError(
            f"{path} has no checkpoint for rank tp={tp_rank} pp={pp_rank} "
            f"(it lists {manifest['ranks']}); export again: {export_command(source, running)}"
        )
    rank_path = os.path.join(path, rel)
    index = read_index(rank_path)
    meta = json.loads(index.metadata.get(META_KEY, "null") or "null")
    if (
        not isinstance(meta, dict)
        or meta.get("made_for") != asdict(made)
        or (meta.get("tp_rank"), meta.get("pp_rank")) != (tp_rank, pp_rank)
    ):
        raise CheckpointMismatchError(
            f"{rank_path} does not record the export it belongs to (rank tp={tp_rank} "
            f"pp={pp_rank}, {made.describe()}); export again: {export_command(source, running)}"
        )
    problems: list[str] = []
    names = set(index.tensors) | set(index.aliases)
    for name in sorted(set(state) - names):
        problems.append(f"{name} is not in the export")
    for name in sorted(names - set(state)):
        problems.append(f"{name} is not a parameter of this model")
    for name in sorted(names & set(state)):
        entry = index.entry(name)
        t = state[name]
        want = dtypes.torch_dtype(entry.dtype, tensor=name)
        if tuple(t.shape) != tuple(entry.shape) or t.dtype != want:
            problems.append(
                f"{name}: export {list(entry.shape)} {entry.dtype}, model {list(t.shape)} "
                f"{str(t.dtype).removeprefix('torch.')}"
            )
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 8 else ""
        )
        raise CheckpointMismatchError(
            f"{rank_path} does not match the model vLLM built: {shown}. Export again: "
            f"{export_command(source, running)}"
        )
    with torch.no_grad():
        result = _read_into(state, rank_path, index, options=options, device=device, loader=loader)
        for alias, target in index.aliases.items():
            if state[alias].data_ptr() != state[target].data_ptr():
                state[alias].copy_(state[target])
    return result


def _read_into(
    state: Mapping[str, torch.Tensor],
    rank_path: str,
    index: Any,
    *,
    options: VllmLoadOptions,
    device: str,
    loader: Loader,
) -> LoadStats:
    """Every stored tensor of the rank's checkpoint into its parameter: straight into the
    parameter's memory (one executor run), except with ``verify`` (windows whose whole checksum
    chunks are checked, each tensor then copied in: the bytes checked are the bytes used) and for
    parameters with gaps in their memory (read, then copied in)."""
    import torch

    from fastckpt.loader.shardplan import plan_into
    from fastckpt.loader.stats import combine
    from fastckpt.loader.stream import iter_tensors

    cfg = loader.config(io_engine=options.engine)
    if options.verify:
        parts: list[LoadStats] = []
        for name, t in iter_tensors(
            rank_path,
            device,
            names=list(index.tensors),
            index=index,
            loader=loader,
            stats=parts,
            verify=True,
            engine=options.engine,
        ):
            state[name].copy_(t)
        return combine(parts)
    stored = [n for n in index.tensors if state[n].is_contiguous()]
    strided = [n for n in index.tensors if not state[n].is_contiguous()]
    with loader.open_source(index, cfg=cfg, convert=False) as opened:
        plan = plan_into(opened.index, stored, device, chunk_bytes=cfg.ring_slot_bytes)
        into = {i: state[n].detach().reshape(-1).view(torch.uint8) for i, n in enumerate(stored)}
        _, result = loader.execute(opened, device, plan=plan, into=into, tiers=False, cfg=cfg)
        if strided:
            got, more = loader.execute(opened, device, names=strided, cfg=cfg, tiers=False)
            for n in strided:
                state[n].copy_(got[n])
            result = combine([result, more])
    return result


def export_model(
    model: str,
    out: str,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    overwrite: bool = False,
    checkpoint: str | None = None,
    engine_args: Mapping[str, Any] | None = None,
) -> Target:
    """Run vLLM once on ``model`` (a local folder: stock safetensors or fastckpt) with these
    settings and publish a per-rank export of its weights at ``out`` (atomically: a failed run
    leaves nothing there). ``checkpoint`` reads the weights from another folder, as the plug-in's
    option does; ``engine_args`` go to ``vllm.LLM`` as they are. Returns what the export was
    made for."""
    import gc

    from vllm import LLM

    from fastckpt.format.atomic import Staging

    if not os.path.isdir(model):
        raise FileNotFoundError(2, "fastckpt vllm-export reads a local model folder", model)
    model = os.path.abspath(model)
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError("parallel sizes must be at least 1")
    with Staging(out, overwrite=overwrite, marker=MANIFEST) as stage:
        extra: dict[str, Any] = {"export_dir": stage.path}
        if checkpoint:
            extra["checkpoint"] = os.path.abspath(checkpoint)
        args: dict[str, Any] = {
            "enforce_eager": True,
            "max_model_len": 256,
            "max_num_seqs": 1,
            "skip_tokenizer_init": True,
            **dict(engine_args or {}),
        }
        llm = LLM(
            model=model,
            load_format="fastckpt",
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
            quantization=quantization,
            model_loader_extra_config=extra,
            **args,
        )
        try:
            del llm
        finally:
            gc.collect()
            _cleanup_vllm()
        ranks, target = _written(stage.path, tensor_parallel_size, pipeline_parallel_size)
        publish(stage.path, model, ranks, target, carried_from=model)
        stage.publish()
    return target


def _cleanup_vllm() -> None:
    try:
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # pragma: no cover - best effort after the engine is gone
        pass


def _written(staging: str, tp: int, pp: int) -> tuple[list[str], Target]:
    """The rank checkpoints the workers wrote, all for one target with these sizes."""
    from fastckpt.format.reader import read_index

    top = os.path.join(staging, f"tp{tp}-pp{pp}")
    found = sorted(os.listdir(top)) if os.path.isdir(top) else []
    want = sorted(f"rank-pp{p}-tp{t}" for p in range(pp) for t in range(tp))
    if found != want:
        raise RuntimeError(
            f"vLLM's workers wrote {found or 'nothing'} under {top}, expected {want}: was the "
            "engine started with load format fastckpt?"
        )
    meta = json.loads(read_index(os.path.join(top, want[0])).metadata[META_KEY])
    target = Target.from_dict(meta["made_for"])
    return [f"tp{tp}-pp{pp}/{name}" for name in want], target
