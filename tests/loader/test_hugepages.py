"""The huge-page advice for CPU loads' memory: free blocks read from /proc/buddyinfo, and advice
only while they cover a buffer (after what the load already took)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastckpt.config import get_config
from fastckpt.loader.hugepages import MARGIN_BYTES, HugePages, free_huge_page_bytes

BUDDYINFO = """\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32    875    680    581    348    233    171    125    107     87     81    640
Node 0, zone   Normal  71518 125048  60018  22078    379    721    297    174     26     42      0
"""


def _files(tmp_path: Path, buddy: str = BUDDYINFO, hpage: str = "2097152\n") -> tuple[str, str]:
    b, h = tmp_path / "buddyinfo", tmp_path / "hpage_pmd_size"
    b.write_text(buddy)
    h.write_text(hpage)
    return str(b), str(h)


@pytest.mark.skipif(os.sysconf("SC_PAGE_SIZE") != 4096, reason="the sample is of 4 KiB pages")
def test_free_blocks_of_huge_page_size_are_counted(tmp_path: Path) -> None:
    got = free_huge_page_bytes(*_files(tmp_path))
    mib2 = 2 << 20
    # DMA32: 81 blocks of order 9, 640 of order 10; Normal: 42 of order 9; DMA left out
    assert got == 81 * mib2 + 640 * 2 * mib2 + 42 * mib2


def test_unreadable_or_odd_files_count_nothing(tmp_path: Path) -> None:
    assert free_huge_page_bytes(str(tmp_path / "absent"), str(tmp_path / "absent")) == 0
    assert free_huge_page_bytes(*_files(tmp_path, hpage="never\n")) == 0
    assert free_huge_page_bytes(*_files(tmp_path, buddy="garbage\nNode 0, zone x a b\n")) == 0


def test_auto_advises_while_free_huge_pages_cover_the_buffers() -> None:
    hp = HugePages("auto", free=lambda: MARGIN_BYTES + (3 << 30))
    assert hp.advise(2 << 30)  # 2 GiB of 3 free
    assert not hp.advise(2 << 30)  # the first took them
    assert hp.advise(1 << 30)
    assert not HugePages("auto", free=lambda: 0).advise(4 << 20)


def test_always_and_never_do_not_look() -> None:
    def boom() -> int:
        raise AssertionError("looked at the free memory")

    assert HugePages("always", free=boom).advise(1 << 40)
    assert not HugePages("never", free=boom).advise(1 << 20)
    with pytest.raises(ValueError, match="cpu_huge_pages"):
        HugePages("sometimes")


def test_the_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCKPT_CPU_HUGE_PAGES", "never")
    assert get_config().cpu_huge_pages == "never"
    monkeypatch.setenv("FASTCKPT_CPU_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="FASTCKPT_CPU_HUGE_PAGES"):
        get_config()
