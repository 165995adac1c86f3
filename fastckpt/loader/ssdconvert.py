"""The SSD tier's side of a load: a converted local copy of a slower source, made on first use.

Whether a source is slow is the policy's rule (``policy.is_slow_source``: stock safetensors, a
network or FUSE filesystem). Keying by content, one conversion for concurrent callers, checking a
copy before it is used, dropping and rebuilding one that fails a check and falling back to the
source on a full disk are the tier's (``SsdTier.open_copy``).

The conversion itself reads the source through the one load core: the checkpoint the load has
already opened and validated is read window by window by ``Loader.execute`` (mapped where it is
in the page cache, FORMAT.md's rules checked on every tensor) and handed to the writer, so a
converted copy is made of exactly the bytes a load of the source would return.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastckpt.errors import MissingPartitionError
from fastckpt.format.fsdir import CheckpointDir
from fastckpt.format.index import Index, TensorEntry
from fastckpt.format.reader import OpenCheckpoint
from fastckpt.format.stored import StoredTensor
from fastckpt.format.writer import tool_name, write_checkpoint
from fastckpt.loader import policy, profile
from fastckpt.loader.plan import windows
from fastckpt.tiers.ssd import SsdTier
from fastckpt.tiers.ssdfiles import source_files

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.opening import Opened
    from fastckpt.loader.session import Loader

WINDOW_BYTES = 256 << 20  # tensors read per executor run while converting


def through_ssd(
    tier: SsdTier,
    index: Index,
    source: str,
    convert: Callable[[str, str], Any] | None = None,
) -> tuple[OpenCheckpoint | None, str | None]:
    """(the converted copy, opened; its key, pinned in the tier until the caller unpins it), or
    (None, None) when the source is not slow or no copy could be had. ``convert(src, dst)``
    makes the copy (default: the tier's own)."""
    try:
        _, fs_type = profile.fs_key(index.partitions[0].path) if index.partitions else ("", "")
    except OSError:
        return None, None
    if not policy.is_slow_source(index.kind, fs_type) or not index.partitions:
        return None, None
    got = tier.open_copy(source_files(index), source, convert=convert)
    return (None, None) if got is None else got


def ssd_key(tier: SsdTier, index: Index, source: str) -> str | None:
    """The key of the copy the tier holds for this source as it is now (None: none known)."""
    return tier.key_of(source_files(index), source)


class _Windows:
    """The tensors of an opened checkpoint, read by the load core one window at a time, in the
    order their bytes are stored (the order the writer asks for them in)."""

    def __init__(self, loader: Loader, opened: Opened, window_bytes: int) -> None:
        self._loader = loader
        self._opened = opened
        self._cfg = loader.config()
        self._groups = [
            [stored for stored, _ in group]
            for group in windows(opened.index, list(opened.index.tensors), window_bytes)
        ]
        self._where = {name: g for g, group in enumerate(self._groups) for name in group}
        self._current = -1
        self._tensors: dict[str, Any] = {}

    def bytes_of(self, name: str) -> memoryview:
        g = self._where[name]
        if g != self._current:
            self._tensors = {}
            tensors, _ = self._loader.execute(
                self._opened, "cpu", names=self._groups[g], cfg=self._cfg, tiers=False
            )
            self._tensors, self._current = tensors, g
        import torch

        t = self._tensors.pop(name).reshape(-1).view(torch.uint8)
        return memoryview(t.numpy())


class _CoreTensor(StoredTensor):
    def __init__(self, source: _Windows, entry: TensorEntry) -> None:
        self._source = source
        self.name = entry.name
        self.dtype = entry.dtype
        self.shape = tuple(entry.shape)
        self.nbytes = entry.nbytes

    def write_to(self, out: Any) -> None:
        if self.nbytes:
            out.write(self._source.bytes_of(self.name))


def convert_opened(
    loader: Loader, opened: Opened, dst: str, *, window_bytes: int = WINDOW_BYTES
) -> Index:
    """Write the opened checkpoint as a fastckpt checkpoint at ``dst`` (published atomically),
    its tensors read through the load core, its carried files copied from descriptors opened
    beneath its directory."""
    index = opened.index
    source = _Windows(loader, opened, window_bytes)
    order = sorted(index.tensors.values(), key=lambda e: (e.partition, e.offset, e.name))
    tensors = [_CoreTensor(source, e) for e in order]
    carried = [*index.files, *index.tree]
    fds: dict[str, int] = {}
    try:
        if carried:
            with CheckpointDir(index.root) as d:
                for rel in carried:
                    held = opened.carried.get(rel)
                    if held is not None:
                        fds[rel] = os.dup(held.fd)
                        continue
                    try:
                        f = d.open(rel, error=MissingPartitionError, what="carried file")
                    except FileNotFoundError:
                        raise MissingPartitionError(
                            "carried file is missing", path=os.path.join(index.root, rel)
                        ) from None
                    fds[rel] = f.fd
        top = [rel for rel in carried if "/" not in rel]
        return write_checkpoint(
            dst,
            tensors,
            aliases=dict(index.aliases),
            files=[(rel, os.path.join(index.root, rel)) for rel in top],
            file_fds={rel: fds[rel] for rel in top},
            tree={rel: fds[rel] for rel in carried if "/" in rel},
            metadata={str(k): str(v) for k, v in index.metadata.items()},
            source={"kind": index.kind, "path": index.root, "tool": tool_name()},
            progress=False,
        )
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
