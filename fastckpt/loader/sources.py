"""Byte sources: where a partition's bytes can be taken from, handed to the executor.

The policy names a ``Source`` per buffer; ``Sources`` holds the objects behind those names for one
load. Each of them is one of two things the executor knows how to use:

- a descriptor it can read through the I/O engine or map privately: the checkpoint's validated
  partition files (``files``), the cache daemon's sealed memfds (``daemon``), a DRAM-tier block's
  memfd or held page cache (``dram``);
- memory it can copy from directly: a DRAM-tier block that is pinned for the GPU, or device
  buffers revived from the GPU tier (``gpu``).

A checkpoint streaming in from an object store is the first kind plus ``stream``: its partition
files are local files (a staging file of the SSD tier, or a memfd) still being written by the
download, and each read waits until its range has arrived (``Stream``: one
``io_engine.RangeGate`` per partition, which the C++ copy pipeline waits on itself).

Every descriptor is the one validated against the index (or handed over sealed), never a path
opened again, so FORMAT.md's rules hold for every source in the one place that reads them. A new
kind of storage (an object store) is one more descriptor kind here, not another load loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastckpt import io_engine
from fastckpt.errors import TruncatedError
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.loader.policy import Source


def check_size(index: Index, partition: int, size: int) -> None:
    part = index.partitions[partition]
    if size < part.nbytes:  # a read or a mapping would end past the file
        raise TruncatedError(
            f"partition is {size} bytes, the index needs {part.nbytes}; "
            "it changed after the index was read",
            path=part.path,
            offset=size,
        )


def open_partition(index: Index, partition: int, src: OpenFile, *, direct: bool | None) -> Any:
    """The one place a partition descriptor becomes what a read or a mapping needs, always from
    ``src`` (a validated descriptor, a daemon memfd or a tier block's descriptor), never by path
    again, so a checkpoint republished meanwhile cannot be mixed in. Returns an engine ``File``
    (O_DIRECT when ``direct`` and the file allows it, else buffered) or, with ``direct=None``, a
    duplicate descriptor for mapping (the caller closes it). Raises TruncatedError when the file
    is now shorter than the index."""
    if direct is None:
        check_size(index, partition, os.fstat(src.fd).st_size)
        return os.dup(src.fd)
    f = io_engine.File(index.partitions[partition].path, direct=direct, fd=src.fd)
    try:
        check_size(index, partition, f.size)
    except BaseException:
        f.close()
        raise
    return f


class Stream(Protocol):
    """Partition files whose bytes are still arriving (``fastckpt.loader.remotesource``)."""

    def gate(self, partition: int) -> io_engine.RangeGate | None:
        """The gate of ``partition``'s file (None: all of it is there)."""
        ...

    def want(self, partition: int, lo: int, hi: int) -> None:
        """Fetch these bytes next (a reader waits for them)."""
        ...

    def wait(self, partition: int, lo: int, hi: int) -> None:
        """Block until ``[lo, hi)`` of the partition arrived; raise the download's error."""
        ...

    def error(self) -> BaseException | None:
        """Why the download failed (None while it has not)."""
        ...


@dataclass
class Sources:
    """The byte sources of one load (see the module docstring).

    ``files[i]``: partition i's validated open file. ``daemon[i]``: the daemon's sealed memfd of
    partition i (as an ``OpenFile``), when the policy may use the daemon. ``dram[i]``: the DRAM
    tier's block of partition i (file offset = block offset). ``gpu[b]``: the revived device
    buffer of buffer b. ``into[b]``: the caller's memory that buffer b is read into. ``engine``
    returns the I/O engine (started on first use); ``stage`` returns the device stage of a
    device (pinned ring, copy streams); ``reclaim`` frees what a cache keeps idle on a device
    (returns bytes freed). ``open_partition`` turns a descriptor into an engine file or a mapping
    descriptor (a seam for tests).
    """

    engine: Callable[[], io_engine.Engine]
    files: Sequence[OpenFile] = ()
    daemon: Sequence[OpenFile] = ()
    dram: Mapping[int, Any] = field(default_factory=dict)
    gpu: Mapping[int, Any] = field(default_factory=dict)
    stage: Callable[[str], Any] | None = None
    reclaim: Callable[[str], int] | None = None
    open_partition: Callable[..., Any] = open_partition
    # buffer index -> host memory to read a CPU buffer into instead of allocating (DRAM fill)
    cpu_dest: Mapping[int, Any] = field(default_factory=dict)
    # the files' bytes are still arriving: reads of streaming sources wait on it
    stream: Stream | None = None
    # buffer index -> a caller's contiguous uint8 tensor of the buffer's size on its device
    # (a model's parameter), filled instead of a new buffer (``plan_into``)
    into: Mapping[int, Any] = field(default_factory=dict)

    def descriptor(self, source: Source, partition: int) -> OpenFile:
        """The descriptor holding ``partition``'s bytes under ``source``."""
        if source is Source.DAEMON:
            return self.daemon[partition]
        if source is Source.DRAM_TIER:
            block = self.dram[partition]
            fd = block.fd
            if fd is None:
                raise RuntimeError("internal error: the DRAM-tier block was closed during a load")
            return OpenFile(fd, "", block.nbytes, 0, 0)
        return self.files[partition]


class EngineFiles:
    """Engine files made on demand from a load's descriptors (O_DIRECT or buffered, per source),
    closed together."""

    def __init__(self, index: Index, sources: Sources) -> None:
        self._index = index
        self._sources = sources
        self._open: dict[tuple[str, int, bool], io_engine.File] = {}
        self._lock = threading.Lock()

    def get(self, source: Source, partition: int, direct: bool) -> io_engine.File:
        kind = source.tier if not source.from_files else "files"
        key = (kind, partition, direct)
        with self._lock:
            f = self._open.get(key)
            if f is None:
                src = self._sources.descriptor(source, partition)
                f = self._sources.open_partition(self._index, partition, src, direct=direct)
                self._open[key] = f
            return f

    def close(self) -> None:
        with self._lock:
            files, self._open = list(self._open.values()), {}
        for f in files:
            f.close()
