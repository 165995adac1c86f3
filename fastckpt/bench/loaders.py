"""The loaders under test, and exactly how each is called. Runs inside the worker process.

Every loader is called the way its documentation shows for loading a whole checkpoint onto one
device, with its defaults, and returns ``{name: tensor}``. Objects that own the returned memory
(a streamer, a file buffer) are kept alive until the worker has checked the tensors.

| name | source | call |
|---|---|---|
| fastckpt | fastckpt dir | ``fastckpt.load(dir, device=..., stats=True)`` |
| fastckpt-st | stock safetensors | ``fastckpt.load(st_dir, device=..., stats=True)`` |
| safetensors | stock safetensors | ``safetensors.torch.load_file(shard, device=...)`` per shard |
| torch-mmap | torch .bin | ``torch.load(f, mmap=True, weights_only=True)`` then ``.to(device)`` |
| runai | stock safetensors | ``SafetensorsStreamer().stream_files(shards, device=...)`` |
| fastsafetensors | stock safetensors | ``fastsafe_open(shards, device=..., nogds=True)`` |
| instanttensor | stock safetensors | ``instanttensor.safe_open(shards, "pt", device)`` (CUDA) |
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoaderSpec:
    name: str
    source: str  # the checkpoint form it reads: "fastckpt" | "safetensors" | "torch"
    module: str  # what must import for it to be available
    distribution: str  # the package whose version is reported
    label: str
    peer: bool = False
    cuda_only: bool = False


LOADERS: dict[str, LoaderSpec] = {
    s.name: s
    for s in (
        LoaderSpec("fastckpt", "fastckpt", "fastckpt", "fastckpt", "fastckpt.load (fastckpt dir)"),
        LoaderSpec(
            "fastckpt-st", "safetensors", "fastckpt", "fastckpt", "fastckpt.load (safetensors)"
        ),
        LoaderSpec(
            "safetensors",
            "safetensors",
            "safetensors.torch",
            "safetensors",
            "safetensors load_file",
        ),
        LoaderSpec("torch-mmap", "torch", "torch", "torch", "torch.load(mmap) + .to"),
        LoaderSpec(
            "runai",
            "safetensors",
            "runai_model_streamer",
            "runai-model-streamer",
            "Run:ai model streamer",
            peer=True,
        ),
        LoaderSpec(
            "fastsafetensors",
            "safetensors",
            "fastsafetensors",
            "fastsafetensors",
            "fastsafetensors (nogds)",
            peer=True,
        ),
        LoaderSpec(
            "instanttensor",
            "safetensors",
            "instanttensor",
            "instanttensor",
            "InstantTensor",
            peer=True,
            cuda_only=True,
        ),
    )
}
ALIASES = {
    "runai-model-streamer": "runai",
    "runai_model_streamer": "runai",
    "torch": "torch-mmap",
    "load_file": "safetensors",
    "instant-tensor": "instanttensor",
}


def resolve_names(text: str) -> list[str]:
    """Parse ``--loaders``: comma-separated names (aliases allowed) or ``all``."""
    if text.strip().lower() in ("", "all"):
        return list(LOADERS)
    out: list[str] = []
    for raw in text.split(","):
        key = raw.strip().lower()
        if not key:
            continue
        key = ALIASES.get(key, key)
        if key not in LOADERS:
            raise ValueError(
                f"unknown loader {raw.strip()!r}; known: {', '.join(LOADERS)} (or 'all')"
            )
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("--loaders names no loader")
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def availability(name: str, *, cuda: bool) -> dict[str, Any]:
    """``{"available": bool, "reason": str, "version": str | None}`` for one loader."""
    spec = LOADERS[name]
    if spec.cuda_only and not cuda:
        return {"available": False, "reason": "needs a CUDA device", "version": None}
    try:
        if spec.source == "fastckpt" or spec.name == "fastckpt-st":
            import fastckpt

            fastckpt.load  # noqa: B018 - resolves the lazy export (imports the loader)
        else:
            importlib.import_module(spec.module)
    except Exception as exc:
        return {
            "available": False,
            "reason": f"cannot import: {type(exc).__name__}: {exc}",
            "version": _version(spec.distribution),
        }
    return {"available": True, "reason": "", "version": _version(spec.distribution)}


@dataclass
class Loaded:
    tensors: dict[str, Any]
    keepalive: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the tensors, then close what owned their memory."""
        self.tensors.clear()
        for obj in reversed(self.keepalive):
            for closer in ("close", "__exit__"):
                fn = getattr(obj, closer, None)
                if fn is None:
                    continue
                with contextlib.suppress(Exception):
                    fn() if closer == "close" else fn(None, None, None)
                break
        self.keepalive.clear()


def _stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    if hasattr(stats, "as_dict"):
        raw = stats.as_dict()
    elif dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        raw = dataclasses.asdict(stats)
    else:
        raw = {k: getattr(stats, k) for k in ("nbytes", "seconds", "gbps", "engine", "path_taken")}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out


def _fastckpt(path: str, device: str) -> Loaded:
    import fastckpt

    try:
        result = fastckpt.load(path, device=device, stats=True)
    except TypeError:  # a loader without stats=
        return Loaded(dict(fastckpt.load(path, device=device)))
    tensors, stats = result
    return Loaded(dict(tensors), extra={"load_stats": _stats_dict(stats)})


def _safetensors(files: list[str], device: str) -> Loaded:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(f, device=device))
    return Loaded(out)


def _torch_mmap(file: str, device: str) -> Loaded:
    import torch

    sd = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    if device != "cpu":
        sd = {k: v.to(device) for k, v in sd.items()}
    return Loaded(dict(sd))


def _runai(files: list[str], device: str) -> Loaded:
    from runai_model_streamer import SafetensorsStreamer

    streamer = SafetensorsStreamer()
    streamer.__enter__()  # closed by Loaded.release(): CPU tensors are views of its buffers
    out: dict[str, Any] = {}
    try:
        params = inspect.signature(streamer.stream_files).parameters
        if "device" in params:
            streamer.stream_files(list(files), device=device)
            for name, tensor in streamer.get_tensors():
                out[name] = tensor
        else:
            streamer.stream_files(list(files))
            for name, tensor in streamer.get_tensors():
                out[name] = tensor.to(device)
    except BaseException:
        streamer.__exit__(None, None, None)
        raise
    return Loaded(out, keepalive=[streamer])


def _fastsafetensors(files: list[str], device: str) -> Loaded:
    from fastsafetensors import fastsafe_open

    handle = fastsafe_open(list(files), framework="pt", device=device, nogds=True)
    try:
        out = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a mapping
    except BaseException:
        handle.__exit__(None, None, None)
        raise
    return Loaded(out, keepalive=[handle])


def _instanttensor(files: list[str], device: str) -> Loaded:
    from instanttensor import safe_open

    out: dict[str, Any] = {}
    with safe_open(list(files), framework="pt", device=device) as fh:
        for name, tensor in fh.tensors():
            out[name] = tensor
    return Loaded(out)


def prepare(name: str) -> None:
    """Import what the loader needs, outside the timed region (every loader gets the same)."""
    spec = LOADERS[name]
    if spec.source == "fastckpt" or name == "fastckpt-st":
        import fastckpt

        fastckpt.load  # noqa: B018
    else:
        importlib.import_module(spec.module)


def load(name: str, ckpt: dict[str, Any], device: str) -> Loaded:
    """Run loader ``name`` on the checkpoint set ``ckpt`` (``CheckpointSet.to_json()``)."""
    files = list(ckpt["safetensors_files"])
    calls: dict[str, Callable[[], Loaded]] = {
        "fastckpt": lambda: _fastckpt(ckpt["fastckpt_dir"], device),
        "fastckpt-st": lambda: _fastckpt(ckpt["safetensors_path"], device),
        "safetensors": lambda: _safetensors(files, device),
        "torch-mmap": lambda: _torch_mmap(ckpt["torch_file"], device),
        "runai": lambda: _runai(files, device),
        "fastsafetensors": lambda: _fastsafetensors(files, device),
        "instanttensor": lambda: _instanttensor(files, device),
    }
    if name not in calls:
        raise ValueError(f"unknown loader {name!r}")
    if LOADERS[name].source == "fastckpt" and not ckpt.get("fastckpt_dir"):
        raise ValueError("no fastckpt conversion of this checkpoint")
    if name == "torch-mmap" and not ckpt.get("torch_file"):
        raise ValueError("no torch .bin of this checkpoint")
    return calls[name]()
