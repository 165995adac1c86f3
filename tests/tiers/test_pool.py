"""The host pool pins lazily, piece by piece, and reuses pinned memory; the staging ring grows
slot by slot from it. A recording pinner stands in for cudaHostRegister."""

from __future__ import annotations

import pytest

from fastckpt.tiers import HostPool

PIECE = 64 << 10


class Recorder:
    def __init__(self) -> None:
        self.pinned: list[tuple[int, int]] = []
        self.unpinned: list[int] = []

    def pin(self, address: int, nbytes: int) -> None:
        self.pinned.append((address, nbytes))

    def unpin(self, address: int) -> None:
        self.unpinned.append(address)


def test_pins_only_the_pieces_used_once() -> None:
    rec = Recorder()
    pool = HostPool(piece_bytes=PIECE, pinner=rec.pin, unpinner=rec.unpin)
    block = pool.alloc(5 * PIECE + 100)
    assert block.pinned_bytes == 0  # nothing pinned up front
    assert block.pin_range(10, PIECE + 1) == 2 * PIECE  # pieces 0 and 1
    assert block.pin_range(0, 2 * PIECE) == 0  # already pinned
    assert block.pin_range(5 * PIECE, 5 * PIECE + 50) == block.capacity - 5 * PIECE  # short tail
    assert [a - block.address for a, _ in rec.pinned] == [0, PIECE, 5 * PIECE]


def test_pinned_blocks_are_reused_not_repinned() -> None:
    rec = Recorder()
    pool = HostPool(piece_bytes=PIECE, pinner=rec.pin, unpinner=rec.unpin, retain_bytes=1 << 20)
    block = pool.alloc(2 * PIECE)
    block.pin_range(0, 2 * PIECE)
    pool.free(block)
    again = pool.alloc(2 * PIECE - 4096)
    assert again is block and pool.reused == 1
    assert again.pin_range(0, 2 * PIECE) == 0  # still pinned: no second cudaHostRegister
    assert len(rec.pinned) == 2
    pool.free(again)
    pool.close()
    assert len(rec.unpinned) == 2  # unpinned once, when the pool goes


def test_mapped_out_or_unpinned_blocks_are_not_kept() -> None:
    rec = Recorder()
    pool = HostPool(piece_bytes=PIECE, pinner=rec.pin, unpinner=rec.unpin)
    plain = pool.alloc(PIECE)
    pool.free(plain)
    assert plain.closed  # nothing pinned: nothing worth keeping
    lent = pool.alloc(PIECE)
    lent.pin_range(0, PIECE)
    view = lent.map_private(0, PIECE)  # a caller maps it: never reused for other bytes
    pool.free(lent)
    assert lent.closed and pool.retained_bytes == 0
    view.close()
    with pytest.raises(ValueError, match="page aligned"):
        pool.alloc(PIECE).map_private(100, 10)


def test_tiers_import_neither_torch_nor_core() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fastckpt.tiers; "
        "sys.exit(1 if {'torch', 'fastckpt._core'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
