"""Checksum verification of a checkpoint's partitions (``fastckpt verify``).

``verify(path)`` validates the index (``read_index``), then reads every partition in large pieces
on several threads and compares each chunk's CRC32C with the index. CRC32C runs in the C++ core
with the GIL released, so threads overlap reading and hashing. The first bad chunk in (partition,
chunk) order raises ``ChecksumError``, however the threads happened to finish.

The loader checks chunks inside its pipeline on its own (``fastckpt.loader.checks``), from CRCs
of the pieces it reads.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastckpt.config import get_config
from fastckpt.errors import ChecksumError, TruncatedError
from fastckpt.format import spec
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint

READ_PIECE_BYTES = 16 << 20
"""Largest single read; a checksum chunk larger than this is hashed in pieces."""


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked.

    Attributes:
        path: the checkpoint's root directory.
        kind: ``"fastckpt"`` or ``"safetensors"``.
        partitions: number of partition (or shard) files.
        chunks: number of checksum chunks compared (0 without checksums).
        nbytes: bytes read and hashed (0 without checksums).
        seconds: wall time, index validation included.
        checksums: False when the source has no checksums (safetensors): only its structure was
            validated.
    """

    path: str
    kind: str
    partitions: int
    chunks: int
    nbytes: int
    seconds: float
    checksums: bool

    @property
    def gbps(self) -> float:
        """Hashing throughput in GB/s (0 when nothing was read)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if not self.checksums:
            return (
                f"{self.path}: structure OK ({self.kind}, {self.partitions} file(s)); this format "
                "stores no checksums, so the data itself was not verified"
            )
        return (
            f"{self.path}: OK, {self.chunks} chunk(s) in {self.partitions} partition(s), "
            f"{self.nbytes} bytes in {self.seconds:.2f} s ({self.gbps:.2f} GB/s)"
        )


def chunk_bounds(index: Index, partition: int, chunk: int) -> tuple[int, int]:
    """Byte range ``[start, end)`` of checksum chunk ``chunk`` of partition ``partition``."""
    part = index.partitions[partition]
    size = index.checksum_chunk_bytes
    if part.checksums is None or size is None:
        raise ValueError(f"partition {part.file!r} has no checksums ({index.kind} checkpoint)")
    if not 0 <= chunk < len(part.checksums):
        raise IndexError(
            f"chunk {chunk} out of range: partition {part.file!r} has {len(part.checksums)}"
        )
    start = chunk * size
    return start, min(start + size, part.nbytes)


def _mismatch(index: Index, partition: int, chunk: int, actual: int) -> ChecksumError:
    part = index.partitions[partition]
    assert part.checksums is not None
    start, end = chunk_bounds(index, partition, chunk)
    expected = part.checksums[chunk]
    tensor = next(
        (
            t.name
            for t in index.tensors.values()
            if t.partition == partition and t.offset < end and t.end > start
        ),
        None,
    )
    return ChecksumError(
        f"chunk {chunk} (bytes [{start}, {end})) of partition {partition} has CRC32C "
        f"{actual:#010x}, the index says {expected:#010x}: the data is corrupted (copy or "
        "convert the checkpoint again)",
        path=part.path,
        tensor=tensor,
        offset=start,
        partition=partition,
        expected=expected,
        actual=actual,
    )


class _Verifier:
    def __init__(self, index: Index, threads: int, fds: list[int]) -> None:
        self.index = index
        self.threads = threads
        self.tasks = [
            (p, k)
            for p, part in enumerate(index.partitions)
            for k in range(len(part.checksums or ()))
        ]
        self.next_task = 0
        self.first_bad: tuple[int, BaseException] | None = None
        self.lock = threading.Lock()
        self.fds: dict[int, int] = dict(enumerate(fds))
        self.stop = False
        size = index.checksum_chunk_bytes or 1
        self.piece = min(size, READ_PIECE_BYTES)

    def run(self) -> None:
        workers = max(1, min(self.threads, len(self.tasks)))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="fastckpt-verify") as pool:
                futures = [pool.submit(self._work) for _ in range(workers)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:  # Ctrl-C included: let the workers stop early
                    self.stop = True
                    raise
        finally:
            self.stop = True
        if self.first_bad is not None:
            raise self.first_bad[1]

    def _take(self) -> int | None:
        with self.lock:
            i = self.next_task
            limit = len(self.tasks) if self.first_bad is None else self.first_bad[0]
            if self.stop or i >= limit:
                return None
            self.next_task += 1
            return i

    def _fd(self, partition: int) -> int:
        return self.fds[partition]

    def _work(self) -> None:
        buf = bytearray(self.piece)
        view = memoryview(buf)
        while (i := self._take()) is not None:
            p, k = self.tasks[i]
            try:
                self._check(p, k, view)
            except BaseException as exc:
                with self.lock:
                    if self.first_bad is None or i < self.first_bad[0]:
                        self.first_bad = (i, exc)
                if not isinstance(exc, (ChecksumError, TruncatedError, OSError)):
                    self.stop = True
                    raise

    def _check(self, p: int, k: int, view: memoryview) -> None:
        start, end = chunk_bounds(self.index, p, k)
        fd = self._fd(p)
        crc = 0
        pos = start
        while pos < end:
            want = min(end - pos, len(view))
            got = os.preadv(fd, [view[:want]], pos)
            if got <= 0:
                raise TruncatedError(
                    f"partition ended at byte {pos} while verifying; the index says "
                    f"{self.index.partitions[p].nbytes}",
                    path=self.index.partitions[p].path,
                    offset=pos,
                )
            crc = spec.crc32c(view[:got], crc)
            pos += got
        checksums = self.index.partitions[p].checksums
        assert checksums is not None
        if crc != checksums[k]:
            raise _mismatch(self.index, p, k, crc)


def verify(path: str | os.PathLike[str], *, threads: int | None = None) -> VerifyReport:
    """Validate the checkpoint at ``path`` and check every chunk checksum.

    ``threads``: reader threads (default: the ``io_threads`` setting). Raises ``ChecksumError``
    naming the first bad chunk (partition file, chunk offset, expected and actual CRC32C), another
    ``FormatError`` for a malformed checkpoint. A safetensors source has no checksums: its
    structure is validated and the report says so (``checksums=False``).
    """
    t0 = time.perf_counter()
    with open_checkpoint(path) as ck:
        return verify_open(ck, threads=threads, _t0=t0)


def verify_open(
    ck: OpenCheckpoint, *, threads: int | None = None, _t0: float | None = None
) -> VerifyReport:
    """``verify`` of an already opened checkpoint: its open partition files are read, whatever
    happened to the paths since they were validated."""
    t0 = time.perf_counter() if _t0 is None else _t0
    index = ck.index
    if threads is None:
        threads = get_config().resolved_io_threads()
    if threads < 1:
        raise ValueError(f"threads = {threads}; it must be >= 1")
    if index.checksum_chunk_bytes is None:
        return VerifyReport(
            path=index.root,
            kind=index.kind,
            partitions=len(index.partitions),
            chunks=0,
            nbytes=0,
            seconds=time.perf_counter() - t0,
            checksums=False,
        )
    verifier = _Verifier(index, threads, [f.fd for f in ck.partitions])
    verifier.run()
    return VerifyReport(
        path=index.root,
        kind=index.kind,
        partitions=len(index.partitions),
        chunks=len(verifier.tasks),
        nbytes=sum(p.nbytes for p in index.partitions),
        seconds=time.perf_counter() - t0,
        checksums=True,
    )


__all__ = ["READ_PIECE_BYTES", "VerifyReport", "chunk_bounds", "verify", "verify_open"]
