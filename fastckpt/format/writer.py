"""Write fastckpt checkpoints (FORMAT.md): ``save(state_dict, path)`` and the streaming core.

The core (``write_checkpoint``) takes a list of ``StoredTensor`` objects (``format.stored``), each
of which knows its name, dtype, shape and size and can stream its bytes into a
``PartitionWriter``. It plans the layout (``format.layout``: device groups, size cap,
alignment), then writes one partition after the
other through a single reusable buffer, computing each partition's chunk CRC32Cs on the way,
copies the carried files, writes the index last and publishes the directory atomically. Peak
memory is the write buffer plus whatever one tensor needs to reach host memory, whatever the
checkpoint's size. The core imports no torch; ``save`` imports it when called.

(Over 500 lines on purpose: the partition writer, the carried-file copies, the index body and the
publishing core are one streaming pipeline whose invariants - checksums per chunk, index last,
atomic publish - are easiest to check in one place.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastckpt.config import get_config
from fastckpt.format import dtypes, spec
from fastckpt.format.atomic import Staging, check_destination, fsync_path
from fastckpt.format.layout import Layout, device_for, normalize_device_map, plan_layout
from fastckpt.format.reader import read_index
from fastckpt.format.stored import StoredTensor, check_tensor_name, state_dict_tensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fastckpt.format.index import Index

_ZEROS = bytes(1 << 16)
_MAX_ALIGNMENT = 1 << 30


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` (the one place partition data reaches the OS)."""
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


# --- progress -----------------------------------------------------------------------------------


def progress_enabled(progress: bool | None) -> bool:
    """Resolve ``progress`` (None = the ``progress`` config knob; ``auto`` = stderr is a tty)."""
    if progress is not None:
        return bool(progress)
    mode = get_config().progress
    if mode == "always":
        return True
    if mode == "never":
        return False
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts written bytes; shows a tqdm bar on stderr when enabled and tqdm is importable."""

    def __init__(self, total: int, *, enabled: bool, desc: str) -> None:
        self.total = total
        self.done = 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,  # decimal, as every size fastckpt prints
                    desc=desc,
                    file=sys.stderr,
                    leave=False,
                    dynamic_ncols=True,
                )

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --- partition files ----------------------------------------------------------------------------


class PartitionWriter:
    """Streams one partition file through a caller-owned buffer, checksumming as it goes.

    ``pos`` is the file offset of the next byte. Sources either hand over bytes (``write``) or
    fill the buffer in place (``space`` + ``commit``, e.g. ``os.preadv`` straight into it).
    """

    def __init__(
        self, path: str, buffer: memoryview, *, chunk_bytes: int, progress: Progress
    ) -> None:
        self.path = path
        self._buf = buffer
        self._fill = 0
        self._flushed = 0
        self._chunk_bytes = chunk_bytes
        self._crc = 0
        self.checksums: list[int] = []
        self._progress = progress
        self.check_bool: str | None = None  # name of the bool tensor being written, if any
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o644)

    @property
    def pos(self) -> int:
        return self._flushed + self._fill

    def space(self) -> memoryview:
        """Writable free space at the end of the buffer (never empty)."""
        if self._fill == len(self._buf):
            self.flush()
        return self._buf[self._fill :]

    def commit(self, nbytes: int) -> None:
        """Account ``nbytes`` written into ``space()``."""
        if nbytes < 0 or self._fill + nbytes > len(self._buf):
            raise ValueError(f"commit of {nbytes} bytes exceeds the buffer")
        if self.check_bool is not None:
            spec.check_bool_bytes(
                self._buf[self._fill : self._fill + nbytes], path=None, tensor=self.check_bool
            )
        self._fill += nbytes

    def write(self, data: memoryview) -> None:
        """Append ``data``; large pieces bypass the buffer (no extra copy)."""
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        if self.check_bool is not None:
            spec.check_bool_bytes(data, path=None, tensor=self.check_bool)
        while len(data):
            if self._fill == 0 and len(data) >= len(self._buf):
                self._emit(data)
                return
            room = self.space()
            k = min(len(room), len(data))
            room[:k] = data[:k]
            self._fill += k
            data = data[k:]

    def zeros(self, nbytes: int) -> None:
        """Append ``nbytes`` zero bytes (alignment gaps, the tail padding)."""
        while nbytes > 0:
            room = self.space()
            k = min(len(room), nbytes, len(_ZEROS))
            room[:k] = _ZEROS[:k]
            self._fill += k
            nbytes -= k

    def pad_to(self, offset: int) -> None:
        if offset < self.pos:
            raise AssertionError(f"pad_to({offset}) behind position {self.pos}")
        self.zeros(offset - self.pos)

    def flush(self) -> None:
        if self._fill:
            self._emit(self._buf[: self._fill])
            self._fill = 0

    def _emit(self, data: memoryview) -> None:
        self._checksum(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, self.path) from exc
            raise
        self._flushed += len(data)
        self._progress.update(len(data))

    def _checksum(self, data: memoryview) -> None:
        chunk = self._chunk_bytes
        pos = self._flushed
        while len(data):
            room = chunk - pos % chunk
            piece = data[:room]
            self._crc = spec.crc32c(piece, self._crc)
            pos += len(piece)
            data = data[room:]
            if pos % chunk == 0:
                self.checksums.append(self._crc)
                self._crc = 0

    def finish(self, nbytes: int) -> list[int]:
        """Pad to ``nbytes``, flush, fsync and close; return the chunk checksums."""
        self.pad_to(nbytes)
        self.flush()
        if self._flushed % self._chunk_bytes:
            self.checksums.append(self._crc)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.path) from exc
        self.close()
        return self.checksums

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- validation of user input -------------------------------------------------------------------


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str; got {type(key).__name__} {key!r} -> "
                f"{type(value).__name__} {value!r}"
            )
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"metadata entry {key!r} is not valid UTF-8") from None
        out[key] = value
    return out


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value}: must be >= {minimum}")
    return value


def _check_alignment(alignment: object) -> int:
    value = _check_int("alignment", alignment, minimum=spec.MIN_ALIGNMENT)
    if value & (value - 1) or value > _MAX_ALIGNMENT:
        raise ValueError(
            f"alignment={value}: must be a power of two between {spec.MIN_ALIGNMENT} and "
            f"{_MAX_ALIGNMENT}"
        )
    return value


# --- the core -----------------------------------------------------------------------------------


def tool_name() -> str:
    from fastckpt._version import __version__

    return f"fastckpt {__version__}"


def write_checkpoint(
    path: str | os.PathLike[str],
    tensors: Sequence[StoredTensor],
    *,
    aliases: Mapping[str, str] | None = None,
    files: Sequence[tuple[str, str]] = (),
    file_fds: Mapping[str, int] | None = None,
    tree: Mapping[str, int] | None = None,
    metadata: Mapping[str, str] | None = None,
    source: Mapping[str, Any] | None = None,
    partition_bytes: int | None = None,
    device_map: Mapping[str, str] | None = None,
    alignment: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Index:
    """Write ``tensors`` as a fastckpt checkpoint at ``path`` and publish it atomically.

    ``files`` are ``(name, source_path)`` pairs copied verbatim into the checkpoint; a name in
    ``file_fds`` is copied from that open descriptor instead of its path (the file the source
    validated). ``tree`` maps carried files in sub-folders (``1_Pooling/config.json``) to open
    descriptors; a checkpoint with such files is written as format version 1.1. Returns the
    validated index of the published checkpoint.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise RuntimeError("fastckpt writes little-endian data and needs a little-endian host")
    cfg = get_config()
    cap = _check_int(
        "partition_bytes",
        cfg.partition_bytes if partition_bytes is None else partition_bytes,
        minimum=1,
    )
    align = _check_alignment(cfg.alignment_bytes if alignment is None else alignment)
    chunk_bytes = cfg.checksum_chunk_bytes
    dmap = normalize_device_map(device_map)
    meta = check_metadata(metadata)
    alias_map = dict(aliases or {})

    names: set[str] = set()
    for t in tensors:
        check_tensor_name(t.name)
        # The reader's limits, before any work: a checkpoint we write must load.
        shape = spec.check_shape(list(t.shape), path=None, tensor=t.name)
        spec.shape_nbytes(dtypes.get(t.dtype).itemsize, shape, path=None, tensor=t.name)
        if t.name in names:
            raise ValueError(f"tensor name {t.name!r} appears twice")
        names.add(t.name)
    for alias, target in alias_map.items():
        check_tensor_name(alias)
        if alias in names:
            raise ValueError(f"alias {alias!r} is also a stored tensor name")
        if target not in names:
            raise ValueError(f"alias {alias!r} points to {target!r}, which is not a stored tensor")
    reserved = {spec.INDEX_FILE}
    carried: list[tuple[str, str]] = []
    for fname, fsrc in files:
        spec.check_file_name(fname, path=fsrc)
        if fname in reserved or (fname.startswith("part-") and fname.endswith(".fckpt")):
            raise ValueError(f"carried file {fname!r} would clash with a fastckpt file name")
        reserved.add(fname)
        carried.append((fname, fsrc))

    tree_items = sorted((tree or {}).items())
    for rel, _ in tree_items:
        spec.check_tree_path(rel, path=None)
        if rel.split("/", 1)[0] in reserved:
            raise ValueError(f"carried tree file {rel!r} would clash with a carried file")

    layout = plan_layout(
        [t.nbytes for t in tensors],
        [device_for(t.name, dmap) for t in tensors],
        partition_bytes=cap,
        alignment=align,
    )
    dst = os.path.abspath(os.fspath(path))
    check_destination(dst, overwrite=overwrite)  # fail fast, before any work
    total = sum(n for _, n in layout.partitions)
    buf_nbytes = max(spec.PAGE, min(cfg.write_buffer_bytes, _round_up(max(total, 1), spec.PAGE)))

    with Staging(dst, overwrite=overwrite) as stage:
        progress_bar = Progress(
            total, enabled=progress_enabled(progress), desc=os.path.basename(dst)
        )
        try:
            checksums = _write_partitions(
                stage.path, tensors, layout, bytearray(buf_nbytes), chunk_bytes, progress_bar
            )
        finally:
            progress_bar.close()
        fds = file_fds or {}
        for fname, fsrc in carried:
            target = os.path.join(stage.path, fname)
            if fname in fds:
                _copy_fd(fds[fname], target)
            else:
                shutil.copyfile(fsrc, target)
            fsync_path(target)
        for rel, fd in tree_items:
            target = os.path.join(stage.path, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _copy_fd(fd, target)
            fsync_path(target)
        body = _index_body(
            tensors,
            layout,
            checksums,
            aliases=alias_map,
            files=[f for f, _ in carried],
            tree=[rel for rel, _ in tree_items],
            metadata=meta,
            source=dict(source or {"kind": "unknown"}),
            alignment=align,
            chunk_bytes=chunk_bytes,
        )
        _write_index(os.path.join(stage.path, spec.INDEX_FILE), body)
        read_index(stage.path)  # never publish what our own reader refuses
        stage.publish()
    return read_index(dst)


def _copy_fd(src_fd: int, target: str) -> None:
    """Copy the whole file open at ``src_fd`` (from offset 0) into a new file ``target``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    out = os.open(target, flags, 0o644)
    try:
        pos = 0
        while True:
            data = os.pread(src_fd, 1 << 20, pos)
            if not data:
                break
            _write_all(out, memoryview(data))
            pos += len(data)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, exc.filename or target) from exc
    finally:
        os.close(out)


def _write_partitions(
    root: str,
    tensors: Sequence[StoredTensor],
    layout: Layout,
    buffer: bytearray,
    chunk_bytes: int,
    progress: Progress,
) -> list[list[int]]:
    view = memoryview(buffer)
    by_partition: list[list[int]] = [[] for _ in layout.partitions]
    for i in layout.order:
        by_partition[layout.placements[i][0]].append(i)
    checksums: list[list[int]] = []
    for p, members in enumerate(by_partition):
        out = PartitionWriter(
            os.path.join(root, spec.partition_name(p)),
            view,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )
        try:
            for i in members:
                item = tensors[i]
                offset = layout.placements[i][1]
                out.pad_to(offset)
                out.check_bool = item.name if item.dtype == "bool" else None
                item.write_to(out)
                out.check_bool = None
                if out.pos != offset + item.nbytes:
                    raise AssertionError(
                        f"{item.name}: wrote {out.pos - offset} bytes, expected {item.nbytes}"
                    )
            checksums.append(out.finish(layout.partitions[p][1]))
        finally:
            out.close()
    return checksums


def _index_body(
    tensors: Sequence[StoredTensor],
    layout: Layout,
    checksums: list[list[int]],
    *,
    aliases: Mapping[str, str],
    files: list[str],
    tree: list[str],
    metadata: Mapping[str, str],
    source: dict[str, Any],
    alignment: int,
    chunk_bytes: int,
) -> dict[str, Any]:
    partitions = [
        {"file": spec.partition_name(p), "nbytes": nbytes, "device": dev, "checksums": sums}
        for p, ((dev, nbytes), sums) in enumerate(zip(layout.partitions, checksums, strict=True))
    ]
    entries = []
    for i in layout.order:
        t = tensors[i]
        part, offset = layout.placements[i]
        entries.append(
            {
                "name": t.name,
                "partition": part,
                "offset": offset,
                "nbytes": t.nbytes,
                "dtype": t.dtype,
                "shape": list(t.shape),
            }
        )
    source.setdefault("tool", tool_name())
    extra: dict[str, Any] = {"tree": tree} if tree else {}
    return {
        "format": "fastckpt",
        # 1.1 adds the optional "tree"; a checkpoint without one stays 1.0 for older readers.
        "version": [spec.MAJOR, 1 if tree else spec.MINOR],
        "alignment": alignment,
        "checksum": {"algorithm": spec.CHECKSUM_ALGORITHM, "chunk_bytes": chunk_bytes},
        "partitions": partitions,
        "tensors": entries,
        "aliases": dict(aliases),
        "source": source,
        "metadata": dict(metadata),
        "files": files,
        **extra,
    }


def _write_index(path: str, body: Mapping[str, Any]) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    raw = data.encode("utf-8")
    major, minor = body["version"]
    blob = spec.pack_header(raw, major=major, minor=minor) + raw
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _write_all(fd, memoryview(blob))
        os.fsync(fd)
    except OSError as exc:  # e.g. ENOSPC: say which file
        raise OSError(exc.errno, exc.strerror, exc.filename or path) from exc
    finally:
        os.close(fd)


# --- save ---------------------------------------------------------------------------------------


def save(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    partition_bytes: int | None = None,
    device_map: Mapping[str, str] | None = None,
    alignment: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Index:
    """Save a state dict as a fastckpt checkpoint directory at ``path``.

    Args:
        state_dict: tensor name -> tensor, on any device, any strides. Tied tensors (the same
            view of the same storage) are stored once and recorded as aliases.
        path: the checkpoint directory to create.
        metadata: free-form ``str -> str`` pairs stored in the index.
        partition_bytes: size cap of one partition file (default: config ``partition_bytes``).
        device_map: tensor-name prefix or module name -> device (``""`` is the default); each
            device's tensors go into partitions of their own. Longest dotted prefix wins.
        alignment: tensor offset alignment, a power of two >= 256 (config ``alignment_bytes``).
        overwrite: replace an existing checkpoint at ``path`` (atomically).
        progress: show a progress bar (None: only when stderr is a terminal; config ``progress``).

    Returns:
        The validated ``Index`` of the new checkpoint.

    Raises:
        DestinationExistsError: ``path`` exists and ``overwrite`` is false.
        TypeError, ValueError, DtypeError, DeviceError: invalid input.
        OSError: I/O failure (nothing is left at ``path``).
    """
    items, aliases = state_dict_tensors(state_dict)
    return write_checkpoint(
        path,
        items,
        aliases=aliases,
        metadata=metadata,
        source={"kind": "state_dict", "tool": tool_name()},
        partition_bytes=partition_bytes,
        device_map=device_map,
        alignment=alignment,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = [
    "PartitionWriter",
    "Progress",
    "check_metadata",
    "save",
    "write_checkpoint",
]
