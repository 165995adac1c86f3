"""In-pipeline checksum verification: pieces of a checksum chunk arrive in any order and are
checked once the whole chunk is covered: bookkeeping around CRC32C, with the pieces' CRCs
joined by the engine's ``crc32c_combine``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from fastckpt.errors import ChecksumError
from fastckpt.io_engine import crc32c_combine
from fastckpt.loader.plan import ChunkCheck


class ChunkVerifier:
    """Collects CRCs of byte ranges of a buffer and checks every planned chunk once complete.

    ``feed(buffer, dest_offset, data_len, crc_of)`` is called for each completed read piece with
    a function computing the CRC32C of a sub-range of that piece's bytes (relative offsets).
    """

    def __init__(self, checks: Sequence[ChunkCheck], paths: Sequence[str]) -> None:
        self._paths = paths
        self._by_buffer: dict[int, list[ChunkCheck]] = {}
        for c in checks:
            self._by_buffer.setdefault(c.buffer, []).append(c)
        self._parts: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self._covered: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.checked = 0
        self.total = len(checks)

    def feed(
        self,
        buffer: int,
        dest_offset: int,
        nbytes: int,
        crc_of: Callable[[int, int], int],
    ) -> None:
        for c in self._by_buffer.get(buffer, ()):
            lo = max(c.dest_offset, dest_offset)
            hi = min(c.dest_offset + c.nbytes, dest_offset + nbytes)
            if lo >= hi:
                continue
            crc = crc_of(lo - dest_offset, hi - lo)
            key = (c.buffer, c.chunk)
            with self._lock:
                self._parts.setdefault(key, []).append((lo, hi - lo, crc))
                self._covered[key] = self._covered.get(key, 0) + (hi - lo)
                complete = self._covered[key] == c.nbytes
                parts = sorted(self._parts.pop(key)) if complete else None
            if parts is not None:
                total = parts[0][2]
                for _, length, part_crc in parts[1:]:
                    total = crc32c_combine(total, part_crc, length)
                if total != c.expected:
                    raise ChecksumError(
                        f"checksum mismatch in chunk {c.chunk}: expected {c.expected:#010x}, "
                        f"computed {total:#010x}; the partition is corrupted",
                        path=self._paths[c.partition],
                        offset=c.file_offset,
                        partition=c.partition,
                        expected=c.expected,
                        actual=total,
                    )
                with self._lock:
                    self.checked += 1

    def finish(self) -> None:
        if self.checked != self.total:
            raise RuntimeError(
                f"internal error: verified {self.checked} of {self.total} planned checksum chunks"
            )
