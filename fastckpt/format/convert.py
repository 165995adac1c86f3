"""``convert(src, dst)``: rewrite a checkpoint people have into a fastckpt checkpoint.

Sources are recognised by ``fastckpt.format.sources.open_source`` (safetensors file or shards,
PyTorch state dicts, transformers and peft directories, fastckpt directories). Conversion streams:
tensor bytes go from the source file straight into the write buffer (``pread``; PyTorch zip files
too, located through the memory-mapped state dict), and anything else is copied one tensor at a
time, so peak memory stays near the write buffer plus one tensor. The result is published
atomically (``fastckpt.format.atomic``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastckpt.format.index import Index
from fastckpt.format.sources import open_source
from fastckpt.format.writer import check_metadata, tool_name, write_checkpoint


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    partition_bytes: int | None = None,
    device_map: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> Index:
    """Convert the checkpoint at ``src`` into a fastckpt checkpoint directory ``dst``.

    Args:
        src: a ``.safetensors`` file, a sharded safetensors directory, a PyTorch
            ``.bin``/``.pt``/``.pth`` state dict, a transformers model directory (safetensors or
            ``pytorch_model.bin`` weights; config and tokenizer files are carried over), a peft
            adapter directory, or a fastckpt directory (re-partitioned).
        dst: the checkpoint directory to create.
        overwrite: replace an existing checkpoint at ``dst`` (atomically).
        partition_bytes: size cap of one partition (default: config ``partition_bytes``).
        device_map: tensor-name prefix or module name -> device (``""`` is the default); each
            device's tensors go into partitions of their own.
        metadata: ``str -> str`` pairs stored in the index, on top of the source's own metadata
            (e.g. safetensors ``__metadata__``).
        progress: show a progress bar (None: only when stderr is a terminal).

    Returns:
        The validated ``Index`` of the new checkpoint.

    Raises:
        SourceError: ``src`` is no layout fastckpt reads, or a PyTorch file holds objects other
            than tensors (they are never unpickled).
        FormatError: the source is malformed (a subclass names what and where).
        DestinationExistsError: ``dst`` exists and ``overwrite`` is false.
        OSError: I/O failure, e.g. disk full (nothing is left at ``dst``).
    """
    dst_path = os.path.abspath(os.fspath(dst))
    with open_source(src) as source:
        merged = dict(source.metadata)
        merged.update(check_metadata(metadata))
        provenance = dict(source.provenance or {"kind": source.kind, "path": source.path})
        provenance["tool"] = tool_name()
        return write_checkpoint(
            dst_path,
            source.tensors,
            aliases=source.aliases,
            files=source.files,
            file_fds=source.file_fds,
            tree=source.tree,
            metadata=merged,
            source=provenance,
            partition_bytes=partition_bytes,
            device_map=device_map,
            overwrite=overwrite,
            progress=progress,
        )


__all__ = ["convert"]
