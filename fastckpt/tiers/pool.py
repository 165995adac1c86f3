"""The Loader's host memory pool: memfd-backed blocks, pinned lazily in pieces, reused.

Every block is an anonymous memory file (``memfd_create``) mapped shared into this process. That
gives three things at once:

- a CPU load can map a block *privately* (copy-on-write): tensors are views of the cached bytes,
  a caller that writes to one gets its own copy of that page, and the block stays intact;
- the memory has a file descriptor, so a later machine-wide cache daemon can hand it to another
  process over a Unix socket (SCM_RIGHTS) instead of copying it;
- the shared mapping can be registered with CUDA (``cudaHostRegister``) for PCIe-speed copies.

Pinning costs 0.4 s/GB or more, so a block is pinned in pieces of ``piece_bytes``, each the first
time a GPU copy needs it (``pin_range``), and a pinned block goes back to the pool when freed,
to be reused by the next ring slot or DRAM-tier item instead of being unpinned and pinned again.
Blocks whose memory was mapped out to callers are never reused (a private mapping still reads the
block's pages it has not copied), they are closed; the memory goes when the last mapping does.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable

PAGE = 4096

Pinner = Callable[[int, int], None]  # (address, nbytes) -> pins the range or raises


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class HostBlock:
    """``capacity`` bytes of memfd memory; ``buffer`` is its shared, writable mapping."""

    def __init__(
        self, capacity: int, piece_bytes: int, pinner: Callable[[], Pinner | None]
    ) -> None:
        self.capacity = max(PAGE, _page_up(capacity))
        self.nbytes = capacity
        self._piece = piece_bytes
        self._pinner = pinner
        self._pinned: set[int] = set()
        self._lock = threading.Lock()
        self.mapped_out = False
        self.fd = os.memfd_create("fastckpt", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.capacity)
            self.buffer: mmap.mmap | None = mmap.mmap(
                self.fd, self.capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        # Where the kernel allows huge pages for shmem on request (shmem_enabled=advise), a
        # private mapping of the block faults in 2 MiB at a time instead of 4 KiB pages.
        with contextlib.suppress(OSError, AttributeError):
            self.buffer.madvise(mmap.MADV_HUGEPAGE)
        self._address = 0

    @property
    def closed(self) -> bool:
        return self.buffer is None

    @property
    def address(self) -> int:
        if not self._address:
            import ctypes

            assert self.buffer is not None
            self._address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        return self._address

    @property
    def pinned_bytes(self) -> int:
        return sum(min(self._piece, self.capacity - p * self._piece) for p in self._pinned)

    def pinned_range(self, lo: int, hi: int) -> bool:
        """Whether every byte of ``[lo, hi)`` is pinned (a device copy can read it directly)."""
        if hi <= lo:
            return True
        with self._lock:
            return all(
                p in self._pinned for p in range(lo // self._piece, (hi - 1) // self._piece + 1)
            )

    def pin_range(self, lo: int, hi: int) -> int:
        """Pin the pieces covering ``[lo, hi)`` that are not pinned yet; returns bytes pinned
        now. Without a pinner (no GPU) nothing happens."""
        pinner = self._pinner()
        if pinner is None or hi <= lo:
            return 0
        done = 0
        with self._lock:
            for p in range(lo // self._piece, (hi - 1) // self._piece + 1):
                if p in self._pinned:
                    continue
                start = p * self._piece
                n = min(self._piece, self.capacity - start)
                pinner(self.address + start, n)
                self._pinned.add(p)
                done += n
        return done

    def map_private(self, offset: int, length: int) -> mmap.mmap:
        """A private (copy-on-write) mapping of ``[offset, offset + length)``; ``offset`` must be
        a multiple of the page size."""
        if offset % PAGE:
            raise ValueError(f"private mapping offset {offset} is not page aligned")
        self.mapped_out = True
        return mmap.mmap(
            self.fd,
            length,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )

    def close(self, unpin: Callable[[int], None] | None = None) -> None:
        if self.buffer is None:
            return
        if self._pinned and unpin is not None:
            for p in sorted(self._pinned):
                unpin(self.address + p * self._piece)
        self._pinned.clear()
        with contextlib.suppress(BufferError):
            self.buffer.close()  # fails while a tensor views the mapping: it goes with that tensor
        self.buffer = None
        os.close(self.fd)


class HostPool:
    """Allocates ``HostBlock``s, keeps freed pinned blocks (up to ``retain_bytes``) for reuse."""

    def __init__(
        self,
        *,
        piece_bytes: int = 64 << 20,
        pinner: Pinner | None = None,
        unpinner: Callable[[int], None] | None = None,
        retain_bytes: int = 1 << 30,
    ) -> None:
        self.piece_bytes = piece_bytes
        self.pinner = pinner
        self.unpinner = unpinner
        self.retain_bytes = retain_bytes
        self._free: list[HostBlock] = []
        self._lock = threading.Lock()
        self.allocated = 0
        self.reused = 0

    def alloc(self, nbytes: int) -> HostBlock:
        with self._lock:
            best: HostBlock | None = None
            for b in self._free:
                if nbytes <= b.capacity <= 2 * max(nbytes, PAGE) and (
                    best is None or b.capacity < best.capacity
                ):
                    best = b
            if best is not None:
                self._free.remove(best)
                best.nbytes = nbytes
                self.reused += 1
                return best
        block = HostBlock(nbytes, self.piece_bytes, lambda: self.pinner)
        with self._lock:
            self.allocated += 1
        return block

    def free(self, block: HostBlock) -> None:
        """Return ``block``: kept for reuse when it is pinned and nobody maps it, else closed."""
        if block.closed:
            return
        with self._lock:
            kept = sum(b.capacity for b in self._free)
            if (
                not block.mapped_out
                and block.pinned_bytes
                and kept + block.capacity <= self.retain_bytes
            ):
                self._free.append(block)
                return
        block.close(self.unpinner)

    @property
    def retained_bytes(self) -> int:
        with self._lock:
            return sum(b.capacity for b in self._free)

    def close(self) -> None:
        with self._lock:
            blocks, self._free = self._free, []
        for b in blocks:
            b.close(self.unpinner)
