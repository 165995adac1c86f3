"""LLaMA-like benchmark checkpoints, in the three forms the loaders read.

``generate_checkpoint(workdir, size_bytes)`` writes, under ``workdir/llama-<size>/``:

- ``safetensors/``: sharded ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` and a ``config.json`` (what a model hub serves);
- ``torch/pytorch_model.bin``: the same tensors through ``torch.save`` (for ``torch.load``);
- ``fastckpt/``: ``fastckpt.convert`` of the safetensors folder, when the converter exists;
- ``manifest.json``: the shape and the file list, written last. A folder whose manifest matches
  the request is reused instead of regenerated.

Shapes follow LLaMA (hidden size h, MLP size about 2.69 h, vocabulary up to 32000): the 7.8 GB
anchor checkpoint of the project's benchmark brief is h=4096 with 18 layers, 165 tensors. Data are
random normals (never zeros, so no filesystem or cache can shortcut them), generated on the GPU
when there is one.

(About 500 lines on purpose: the shape, the three writers and the reuse manifest describe one
checkpoint set; each part is short.)
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastckpt.bench.common import log
from fastckpt.rules.units import format_bytes

GENERATOR_VERSION = 1
ST_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
FASTCKPT_INDEX = "fastckpt.index"

# (hidden, intermediate, vocab): LLaMA-7B's proportions, scaled down for small sizes.
PRESETS: tuple[tuple[int, int, int], ...] = (
    (4096, 11008, 32000),
    (2048, 5504, 32000),
    (1024, 2816, 32000),
    (512, 1376, 8192),
    (256, 688, 2048),
    (128, 344, 1024),
    (64, 172, 256),
)
MIN_LAYERS = 8
ITEMSIZE = 2  # bfloat16


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    dtype: str = "bfloat16"

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order a transformers checkpoint stores them."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            specs += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return specs

    @property
    def nbytes(self) -> int:
        total = 0
        for _, shape in self.tensor_specs():
            n = 1
            for d in shape:
                n *= d
            total += n * ITEMSIZE
        return total


def _layer_bytes(h: int, i: int) -> int:
    return (4 * h * h + 3 * h * i + 2 * h) * ITEMSIZE


def choose_shape(target_bytes: int) -> LlamaShape:
    """The largest LLaMA-like preset that reaches ``target_bytes`` with at least 8 layers."""
    if target_bytes < 1_000_000:
        raise ValueError(f"benchmark size {target_bytes} B is too small: use at least 1 MB")
    for h, i, v in PRESETS:
        fixed = (2 * v * h + h) * ITEMSIZE
        layers = round((target_bytes - fixed) / _layer_bytes(h, i))
        if layers >= MIN_LAYERS:
            return LlamaShape(h, i, v, layers)
    h, i, v = PRESETS[-1]
    fixed = (2 * v * h + h) * ITEMSIZE
    return LlamaShape(h, i, v, max(1, round((target_bytes - fixed) / _layer_bytes(h, i))))


def plan_shards(
    specs: Sequence[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most ``shard_bytes`` (one tensor may exceed)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        n = ITEMSIZE
        for d in shape:
            n *= d
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    return shards


def auto_shard_bytes(total_bytes: int) -> int:
    """At least two shards (so sharded reading is always exercised), at most 4 GiB each."""
    return max(1 << 20, min(4 << 30, (total_bytes + 1) // 2 + (total_bytes // 64)))


@dataclass(frozen=True)
class CheckpointSet:
    """One checkpoint in the forms the loaders read; paths are absolute.

    ``safetensors_path`` is what a safetensors-aware loader is given (a sharded folder or one
    file); ``safetensors_files`` the shard files themselves.
    """

    root: str
    safetensors_path: str
    safetensors_files: tuple[str, ...]
    torch_file: str | None
    fastckpt_dir: str | None
    nbytes: int
    tensors: int
    description: dict[str, Any] = field(default_factory=dict)
    owned: tuple[str, ...] = ()  # folders this run created (removed at the end unless --keep)

    def fastckpt_files(self) -> tuple[str, ...]:
        if self.fastckpt_dir is None:
            return ()
        names = sorted(os.listdir(self.fastckpt_dir))
        return tuple(
            os.path.join(self.fastckpt_dir, n)
            for n in names
            if os.path.isfile(os.path.join(self.fastckpt_dir, n))
        )

    def files_for(self, source: str) -> tuple[str, ...]:
        """The data files a loader of ``source`` kind reads."""
        if source == "safetensors":
            return self.safetensors_files
        if source == "torch":
            return (self.torch_file,) if self.torch_file else ()
        if source == "fastckpt":
            return self.fastckpt_files()
        raise ValueError(f"unknown checkpoint form {source!r}")

    def all_files(self) -> tuple[str, ...]:
        return self.safetensors_files + self.files_for("torch") + self.fastckpt_files()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _make_tensor(torch: Any, name: str, shape: tuple[int, ...], seed: int, device: str) -> Any:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if len(shape) == 1:  # norms: around 1, like trained RMSNorm weights
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        t = (1.0 + 0.1 * t).to(torch.bfloat16)
    else:
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
        t.mul_(0.02)
    return t.cpu()


def write_stock_checkpoint(
    dest: str,
    shape: LlamaShape,
    *,
    seed: int = 0,
    shard_bytes: int | None = None,
    with_torch_bin: bool = True,
    gen_device: str = "auto",
) -> None:
    """Write the safetensors shards (+ index, config.json) and the torch .bin into ``dest``."""
    import torch
    from safetensors.torch import save_file

    if gen_device == "auto":
        gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = shape.tensor_specs()
    shards = plan_shards(specs, shard_bytes or auto_shard_bytes(shape.nbytes))
    st_dir = os.path.join(dest, "safetensors")
    os.makedirs(st_dir, exist_ok=True)
    weight_map: dict[str, str] = {}
    everything: dict[str, Any] = {}
    index = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, Any] = {}
        for name, tshape in shard:
            tensors[name] = _make_tensor(torch, name, tshape, seed * 1_000_003 + index, gen_device)
            index += 1
            weight_map[name] = fname
        save_file(tensors, os.path.join(st_dir, fname), metadata={"format": "pt"})
        if with_torch_bin:
            everything.update(tensors)
        log(f"generate: wrote {fname} ({len(shard)} tensors)")
        del tensors
    with open(os.path.join(st_dir, ST_INDEX), "w", encoding="utf-8") as fh:
        json.dump(
            {"metadata": {"total_size": shape.nbytes}, "weight_map": weight_map}, fh, indent=2
        )
    with open(os.path.join(st_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": shape.hidden,
                "intermediate_size": shape.intermediate,
                "num_hidden_layers": shape.layers,
                "num_attention_heads": max(1, shape.hidden // 128),
                "num_key_value_heads": max(1, shape.hidden // 128),
                "vocab_size": shape.vocab,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            },
            fh,
            indent=2,
        )
    if with_torch_bin:
        os.makedirs(os.path.join(dest, "torch"), exist_ok=True)
        torch.save(everything, os.path.join(dest, "torch", TORCH_FILE))
        log(f"generate: wrote {TORCH_FILE}")
    del everything


def try_convert(st_path: str, dst: str) -> tuple[bool, str]:
    """``fastckpt.convert(st_path, dst)``; ``(False, reason)`` if the converter is missing/fails."""
    try:
        import fastckpt

        convert: Callable[..., Any] = fastckpt.convert
    except (ImportError, AttributeError) as exc:
        return False, f"fastckpt.convert is not available ({exc})"
    try:
        convert(st_path, dst)
    except Exception as exc:
        shutil.rmtree(dst, ignore_errors=True)
        return False, f"fastckpt.convert failed: {type(exc).__name__}: {exc}"
    return True, "converted"


def _manifest_matches(path: str, request: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    if manifest.get("request") != request:
        return None
    for rel, size in manifest.get("files", {}).items():
        full = os.path.join(os.path.dirname(path), rel)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            return None
    return manifest


def _set_from_manifest(root: str, manifest: dict[str, Any]) -> CheckpointSet:
    st_dir = os.path.join(root, "safetensors")
    files = tuple(os.path.join(st_dir, f) for f in manifest["safetensors_files"])
    torch_file = os.path.join(root, "torch", TORCH_FILE) if manifest.get("torch") else None
    fck = os.path.join(root, "fastckpt") if manifest.get("fastckpt") else None
    return CheckpointSet(
        root=root,
        safetensors_path=st_dir,
        safetensors_files=files,
        torch_file=torch_file,
        fastckpt_dir=fck,
        nbytes=int(manifest["nbytes"]),
        tensors=int(manifest["tensors"]),
        description=dict(manifest["shape"]),
    )


def _write_manifest(root: str, manifest: dict[str, Any]) -> None:
    files: dict[str, int] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == "manifest.json":
                continue
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, root)] = os.path.getsize(full)
    manifest = dict(manifest, files=files)
    tmp = os.path.join(root, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, "manifest.json"))


def generate_checkpoint(
    workdir: str,
    size_bytes: int,
    *,
    seed: int = 0,
    shard_bytes: int | None = None,
    with_torch_bin: bool = True,
    with_fastckpt: bool = True,
    gen_device: str = "auto",
) -> tuple[CheckpointSet, list[str]]:
    """Generate (or reuse) the checkpoint for ``size_bytes``; returns the set and notes."""
    shape = choose_shape(size_bytes)
    shard_cap = shard_bytes or auto_shard_bytes(shape.nbytes)
    request: dict[str, Any] = {
        "generator": GENERATOR_VERSION,
        "shape": asdict(shape),
        "seed": seed,
        "shard_bytes": shard_cap,
    }
    notes: list[str] = []
    root = os.path.join(os.path.abspath(workdir), f"llama-{size_bytes}")
    manifest = _manifest_matches(os.path.join(root, "manifest.json"), request)
    if manifest is not None and (manifest.get("torch") or not with_torch_bin):
        ckpt = _set_from_manifest(root, manifest)
        log(f"generate: reusing {root} ({format_bytes(ckpt.nbytes)}, {ckpt.tensors} tensors)")
        if with_fastckpt and ckpt.fastckpt_dir is None:
            ok, why = try_convert(ckpt.safetensors_path, os.path.join(root, "fastckpt"))
            if ok:
                manifest["fastckpt"] = True
                _write_manifest(root, manifest)
                ckpt = _set_from_manifest(root, manifest)
            else:
                notes.append(why)
        return ckpt, notes

    shutil.rmtree(root, ignore_errors=True)
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        log(
            f"generate: LLaMA-like h={shape.hidden} layers={shape.layers} vocab={shape.vocab}: "
            f"{format_bytes(shape.nbytes)}, {len(shape.tensor_specs())} tensors -> {root}"
        )
        write_stock_checkpoint(
            tmp,
            shape,
            seed=seed,
            shard_bytes=shard_cap,
            with_torch_bin=with_torch_bin,
            gen_device=gen_device,
        )
        fck_ok = False
        if with_fastckpt:
            fck_ok, why = try_convert(
                os.path.join(tmp, "safetensors"), os.path.join(tmp, "fastckpt")
            )
            log(f"generate: fastckpt conversion: {why}")
            if not fck_ok:
                notes.append(why)
        _fsync_tree(tmp)
        shards = sorted(
            f for f in os.listdir(os.path.join(tmp, "safetensors")) if f.endswith(".safetensors")
        )
        manifest = {
            "request": request,
            "shape": asdict(shape),
            "nbytes": shape.nbytes,
            "tensors": len(shape.tensor_specs()),
            "safetensors_files": shards,
            "torch": with_torch_bin,
            "fastckpt": fck_ok,
        }
        os.replace(tmp, root)
        _write_manifest(root, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt = _set_from_manifest(root, manifest)
    return replace(ckpt, owned=(root,)), notes


def existing_checkpoint(
    path: str,
    workdir: str,
    *,
    with_torch_bin: bool = True,
    with_fastckpt: bool = True,
) -> tuple[CheckpointSet, list[str]]:
    """Use a checkpoint that exists: one of ours (with ``manifest.json``) or stock safetensors.

    For stock safetensors (one file or a sharded folder) the torch ``.bin`` and the fastckpt
    conversion are derived into ``workdir`` (removed at the end unless ``--keep``).
    """
    path = os.path.abspath(path)
    notes: list[str] = []
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
        return _set_from_manifest(path, manifest), notes
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"--checkpoint {path}: expected a .safetensors file or a folder")
        files: tuple[str, ...] = (path,)
    elif os.path.isdir(path):
        if os.path.isfile(os.path.join(path, FASTCKPT_INDEX)):
            raise ValueError(
                f"--checkpoint {path} is a fastckpt checkpoint; pass the stock safetensors "
                "checkpoint it came from (the harness checks every loader against safetensors)"
            )
        idx = os.path.join(path, ST_INDEX)
        if os.path.isfile(idx):
            with open(idx, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = tuple(os.path.join(path, f) for f in sorted(set(weight_map.values())))
        else:
            files = tuple(
                os.path.join(path, f)
                for f in sorted(os.listdir(path))
                if f.endswith(".safetensors")
            )
        if not files:
            raise ValueError(f"--checkpoint {path}: no .safetensors files in that folder")
    else:
        raise FileNotFoundError(f"--checkpoint {path} does not exist")

    from safetensors import safe_open

    nbytes = 0
    count = 0
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = fh.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes += n * _st_itemsize(sl.get_dtype())
                count += 1
    derived = os.path.join(
        os.path.abspath(workdir), f"derived-{zlib.crc32(path.encode()):08x}-{os.getpid()}"
    )
    os.makedirs(derived, exist_ok=True)
    torch_file = None
    if with_torch_bin:
        import torch
        from safetensors.torch import load_file

        everything: dict[str, Any] = {}
        for f in files:
            everything.update(load_file(f))
        torch_file = os.path.join(derived, "torch", TORCH_FILE)
        os.makedirs(os.path.dirname(torch_file), exist_ok=True)
        torch.save(everything, torch_file)
        del everything
    fck_dir = None
    if with_fastckpt:
        ok, why = try_convert(path, os.path.join(derived, "fastckpt"))
        if ok:
            fck_dir = os.path.join(derived, "fastckpt")
        else:
            notes.append(why)
    _fsync_tree(derived)
    ckpt = CheckpointSet(
        root=os.path.dirname(files[0]) if os.path.isfile(path) else path,
        safetensors_path=path,
        safetensors_files=files,
        torch_file=torch_file,
        fastckpt_dir=fck_dir,
        nbytes=nbytes,
        tensors=count,
        description={"source": path},
        owned=(derived,),
    )
    return ckpt, notes


def _st_itemsize(code: str) -> int:
    from fastckpt.format import dtypes

    return dtypes.from_safetensors(code).itemsize
