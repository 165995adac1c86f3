"""The plug-in's options, parsed from vLLM's ``--model-loader-extra-config``. Imports neither
torch nor vLLM, so the parsing rules are testable anywhere.

Only options that work are accepted; any other key is refused with the list of accepted ones,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastckpt.errors import FastckptError

ENGINES = ("auto", "uring", "pread")


class VllmOptionsError(FastckptError, ValueError):
    """``--model-loader-extra-config`` holds a key or value the fastckpt plug-in does not accept."""


@dataclass(frozen=True)
class VllmLoadOptions:
    """How the plug-in loads a model's weights.

    Attributes:
        engine: fastckpt's I/O engine, ``auto`` (default), ``uring`` or ``pread``.
        verify: check every chunk checksum while loading (converted fastckpt checkpoints only;
            a stock safetensors folder has no checksums and is refused with ``verify``).
        checkpoint: read the weights from this path instead of the model folder (for example a
            converted copy kept beside the original folder, which still supplies config and
            tokenizer), or an ``s3://`` / ``https://`` URL of one (streamed by
            ``fastckpt.load``). ``None``: the model folder itself.
        server: the socket of a ``fastckpt serve`` cache daemon to load through (a fresh vLLM
            worker then maps a checkpoint the daemon holds instead of reading it; without a
            reachable daemon it reads the files, with one warning). ``None``: the
            ``FASTCKPT_SERVER`` setting, if any.
        export_dir: write each rank's weights, as loaded and before vLLM post-processes them,
            into this folder (what ``fastckpt vllm-export`` runs vLLM with; the folder becomes
            a per-rank export once that command writes its manifest).
    """

    engine: str = "auto"
    verify: bool = False
    checkpoint: str | None = None
    server: str | None = None
    export_dir: str | None = None


_DOC = {
    "engine": f"one of {', '.join(ENGINES)}",
    "verify": "true or false",
    "checkpoint": "a path or an s3:// or https:// URL of a fastckpt or safetensors checkpoint",
    "server": "the socket path of a fastckpt serve daemon",
    "export_dir": "a folder for fastckpt vllm-export's per-rank checkpoints",
}


def parse_options(extra: Mapping[str, Any] | None) -> VllmLoadOptions:
    """Turn vLLM's ``model_loader_extra_config`` (a dict, possibly empty) into options.

    Raises ``VllmOptionsError`` naming the offending key, its value and what is accepted.
    """
    if extra is None:
        return VllmLoadOptions()
    if not isinstance(extra, Mapping):
        raise VllmOptionsError(
            f"--model-loader-extra-config for load format 'fastckpt' must be a JSON object, "
            f"got {type(extra).__name__}"
        )
    unknown = sorted(str(k) for k in extra if k not in _DOC)
    if unknown:
        accepted = "; ".join(f"{k} ({v})" for k, v in _DOC.items())
        raise VllmOptionsError(
            f"--model-loader-extra-config: unknown key(s) {', '.join(map(repr, unknown))} for load "
            f"format 'fastckpt'; accepted keys: {accepted}"
        )
    engine = extra.get("engine", "auto")
    if engine not in ENGINES:
        raise VllmOptionsError(
            f"--model-loader-extra-config: engine={engine!r}; expected {_DOC['engine']}"
        )
    verify = extra.get("verify", False)
    if not isinstance(verify, bool):
        raise VllmOptionsError(
            f"--model-loader-extra-config: verify={verify!r}; expected {_DOC['verify']} "
            "(a JSON boolean, not a string)"
        )
    checkpoint = extra.get("checkpoint")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
            raise VllmOptionsError(
                f"--model-loader-extra-config: checkpoint={checkpoint!r}; expected "
                f"{_DOC['checkpoint']}"
            )
        checkpoint = os.fspath(checkpoint)
    server = extra.get("server")
    if server is not None and (not isinstance(server, str) or not server):
        raise VllmOptionsError(
            f"--model-loader-extra-config: server={server!r}; expected {_DOC['server']}"
        )
    export_dir = extra.get("export_dir")
    if export_dir is not None and (not isinstance(export_dir, str) or not export_dir):
        raise VllmOptionsError(
            f"--model-loader-extra-config: export_dir={export_dir!r}; expected {_DOC['export_dir']}"
        )
    return VllmLoadOptions(
        engine=engine, verify=verify, checkpoint=checkpoint, server=server, export_dir=export_dir
    )
