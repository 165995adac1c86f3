"""DRAM-tier partitions kept in the page cache itself: the file's pages, locked in memory.

For a CPU-only item there is no need to copy a partition into a memory file: the checkpoint's own
page-cache pages can stay resident. A ``HeldFile`` keeps the partition's validated descriptor
(the inode the index was checked against; a republish by rename does not change it) and a
read-only shared mapping of it locked in memory (``mlock``), so the kernel cannot evict those
pages. A CPU hit maps the held descriptor privately: tensors are copy-on-write views of the page
cache, as with a warm page-cache mapping, and fault in as fast as one (the page cache uses large
folios where the filesystem supports them, while memfd pages are 4 KiB when shmem huge pages are
off, as on many hosts). The lock counts against ``RLIMIT_MEMLOCK`` unless the process may lock
memory (root, ``CAP_IPC_LOCK``); when locking fails the Loader copies the partition into a memfd
block instead (see ``fastckpt.tiers.pool``).

What this cannot protect: another program writing the file *in place* (not by rename) changes its
page cache, and so what the item and every mapping of the file read; the same holds for any mapped
load (docs/hardening.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable

PAGE = 4096

# (fd, nbytes) -> a function that unlocks and unmaps; raises OSError when the pages cannot be locked
PageLocker = Callable[[int, int], Callable[[], None]]

_libc: ctypes.CDLL | None = None
_libc_lock = threading.Lock()


def _c() -> ctypes.CDLL:
    global _libc
    with _libc_lock:
        if _libc is None:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc = lib
        return _libc


def lock_file_pages(fd: int, nbytes: int) -> Callable[[], None]:
    """Map ``[0, nbytes)`` of ``fd`` shared and read-only and lock it in memory (reading in what
    is not cached yet). Returns the function that releases it. Raises OSError (``ENOMEM`` over
    ``RLIMIT_MEMLOCK``, ``EPERM``, ``EAGAIN``) when the pages cannot be locked."""
    if nbytes <= 0:
        return lambda: None
    lib = _c()
    addr = lib.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mapping {nbytes} bytes to lock them: {os.strerror(err)}")
    if lib.mlock(addr, nbytes) != 0:
        err = ctypes.get_errno()
        lib.munmap(addr, nbytes)
        hint = " (RLIMIT_MEMLOCK, see ulimit -l)" if err in (errno.ENOMEM, errno.EPERM) else ""
        raise OSError(err, f"locking {nbytes} bytes in memory: {os.strerror(err)}{hint}")

    def release() -> None:
        lib.munmap(addr, nbytes)  # unlocks too

    return release


class HeldFile:
    """One partition kept resident in the page cache: owns ``fd`` (a duplicate of the validated
    descriptor) and the lock on its first ``nbytes``. Offers what the executor uses of a
    ``HostBlock``: ``map_private``, ``buffer`` (a private mapping for reading; never pinned),
    ``pin_range`` (pins nothing) and ``pinned_range`` (never pinned: device copies read ``fd``
    through the pinned staging ring)."""

    held = True

    def __init__(self, fd: int, nbytes: int, locker: PageLocker = lock_file_pages) -> None:
        self.nbytes = nbytes
        self.capacity = max(PAGE, -(-nbytes // PAGE) * PAGE)
        self.mapped_out = False
        self._lock = threading.Lock()
        self._buffer: mmap.mmap | None = None
        self._release = locker(fd, nbytes)  # raises: the caller still owns fd
        self.fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self.fd is None

    @property
    def pinned_bytes(self) -> int:
        return 0

    def pin_range(self, lo: int, hi: int) -> int:
        return 0  # page-cache pages are not registered with CUDA

    def pinned_range(self, lo: int, hi: int) -> bool:
        return hi <= lo  # device copies read the held file through the pinned staging ring

    @property
    def buffer(self) -> mmap.mmap | None:
        """A private mapping of the whole partition for reading (writes would stay private)."""
        with self._lock:
            if self._buffer is None and self.fd is not None:
                self._buffer = self._map(0, self.nbytes)
            return self._buffer

    def _map(self, offset: int, length: int) -> mmap.mmap:
        assert self.fd is not None, "held file is closed"
        return mmap.mmap(
            self.fd,
            length,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )

    def map_private(self, offset: int, length: int) -> mmap.mmap:
        """A private (copy-on-write) mapping of ``[offset, offset + length)`` of the file."""
        if offset % PAGE:
            raise ValueError(f"private mapping offset {offset} is not page aligned")
        self.mapped_out = True
        return self._map(offset, length)

    def close(self, unpin: Callable[[int], None] | None = None) -> None:
        with self._lock:
            if self.fd is None:
                return
            fd, self.fd = self.fd, None
            buf, self._buffer = self._buffer, None
        if buf is not None:
            with contextlib.suppress(BufferError):  # a tensor views it: it goes with that
                buf.close()
        self._release()
        os.close(fd)
