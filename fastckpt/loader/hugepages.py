"""Whether the private memory a CPU load reads into is advised for transparent huge pages.

Advised memory is faulted in 2 MiB at a time: a cold 1 GB load read O_DIRECT into it took 0.37 s
on this project's VM where free huge pages were at hand, against 0.8 s in 4 KiB pages. But where
none are free, the kernel compacts memory on the fault (``defrag=madvise``, the usual default),
and the same load took 2.0-2.4 s. So ``auto`` advises a buffer only while the free blocks of
huge-page size (``/proc/buddyinfo``) cover it, after what the load already took, with a margin.
"""

from __future__ import annotations

import os
from collections.abc import Callable

MODES = ("auto", "always", "never")
BUDDYINFO = "/proc/buddyinfo"
HPAGE_SIZE_FILE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
MARGIN_BYTES = 256 << 20  # left free for everyone else
SKIPPED_ZONES = ("DMA",)  # a few MiB the kernel keeps for old devices


def free_huge_page_bytes(buddyinfo: str = BUDDYINFO, hpage_size_file: str = HPAGE_SIZE_FILE) -> int:
    """Bytes in free blocks of at least the huge-page size (0 when it cannot tell)."""
    try:
        with open(hpage_size_file, encoding="ascii") as f:
            hpage = int(f.read().strip())
        with open(buddyinfo, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    if hpage < page:
        return 0
    order = (hpage // page).bit_length() - 1
    total = 0
    for line in lines:
        # "Node 0, zone   Normal  71518 125048 ... (free blocks of order 0, 1, 2...)"
        head, _, counts = line.partition("zone")
        fields = counts.split()
        if not head.startswith("Node") or not fields or fields[0] in SKIPPED_ZONES:
            continue
        try:
            blocks = [int(x) for x in fields[1:]]
        except ValueError:
            continue
        total += sum(n * (page << o) for o, n in enumerate(blocks) if o >= order)
    return total


class HugePages:
    """One load's advice: ``advise(nbytes)`` for each buffer it allocates, in turn."""

    def __init__(self, mode: str, free: Callable[[], int] = free_huge_page_bytes) -> None:
        if mode not in MODES:
            raise ValueError(f"cpu_huge_pages={mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self._free_fn = free
        self._free: int | None = None

    def advise(self, nbytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        if self._free is None:
            self._free = self._free_fn()
        if self._free - nbytes < MARGIN_BYTES:
            return False
        self._free -= nbytes
        return True


__all__ = ["MODES", "HugePages", "free_huge_page_bytes"]
