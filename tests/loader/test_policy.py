"""The policy on its own: made-up plans, residencies, holdings and profiles in, decisions out.
No torch, no files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastckpt.loader.plan import BufferPlan, LoadPlan
from fastckpt.loader.policy import (
    Decision,
    Holdings,
    ReadProfile,
    Settings,
    decide,
    fill_mode,
    is_slow_source,
    mixed_split,
    read_mode,
    summary,
)


def _plan(*buffers: tuple[str, int, int]) -> LoadPlan:
    """Buffers as (device, partition, nbytes)."""
    bufs = tuple(
        BufferPlan(i, dev, part, n, ((0, n, 0),) if n else ())
        for i, (dev, part, n) in enumerate(buffers)
    )
    devices = tuple(sorted({b.device for b in bufs}))
    return LoadPlan(buffers=bufs, reads=(), views=(), aliases={}, checks=(), devices=devices)


def _sources(decisions: tuple[Decision, ...]) -> list[str]:
    return [d.source for d in decisions]


PROFILE_BUFFERED = ReadProfile(
    "8-1-ext4", "ext4", direct_gbps=0.9, buffered_gbps=1.4, source="probe"
)
PROFILE_DIRECT = ReadProfile("8-1-ext4", "ext4", direct_gbps=1.8, buffered_gbps=1.2, source="probe")


def test_page_cache_thresholds_cpu() -> None:
    plan = _plan(("cpu", 0, 4096), ("cpu", 1, 4096), ("cpu", 2, 4096), ("cpu", 3, 0))
    d = decide(plan, residency={0: 1.0, 1: 0.6, 2: 0.1, 3: 1.0}, profile=PROFILE_DIRECT)
    assert _sources(d) == ["page-cache-map", "page-cache-read", "direct", "empty"]
    assert [x.tier for x in d] == ["page-cache", "page-cache", "disk", "none"]


def test_mapping_off_or_verify_reads_instead() -> None:
    plan = _plan(("cpu", 0, 4096))
    assert _sources(decide(plan, residency={0: 1.0}, settings=Settings(cpu_map_cached=False))) == [
        "page-cache-read"
    ]
    assert _sources(decide(plan, residency={0: 1.0}, settings=Settings(verify=True))) == [
        "page-cache-read"
    ]


def test_gpu_buffers_never_map() -> None:
    plan = _plan(("cuda:0", 0, 4096))
    assert _sources(decide(plan, residency={0: 1.0})) == ["page-cache-read"]


def test_cold_mode_follows_the_profile() -> None:
    plan = _plan(("cpu", 0, 4096), ("cuda:0", 1, 4096))
    assert set(_sources(decide(plan, residency={}, profile=PROFILE_BUFFERED))) == {"buffered"}
    assert set(_sources(decide(plan, residency={}, profile=PROFILE_DIRECT))) == {"direct"}
    assert set(_sources(decide(plan, residency={}, profile=None))) == {"direct"}
    forced = Settings(read_mode="mixed")
    assert set(_sources(decide(plan, residency={}, profile=PROFILE_BUFFERED, settings=forced))) == {
        "mixed"
    }


def test_tiers_come_first() -> None:
    plan = _plan(("cuda:0", 0, 4096), ("cuda:1", 0, 4096), ("cpu", 1, 4096))
    held = Holdings(gpu_devices=frozenset({"cuda:0"}), dram=True)
    assert _sources(decide(plan, residency={0: 1.0, 1: 1.0}, holdings=held)) == [
        "gpu-tier",
        "dram-tier",
        "dram-tier",
    ]
    fill = Holdings(dram_can_fill=True)
    assert set(_sources(decide(plan, residency={}, holdings=fill))) == {"dram-fill"}
    # verification reads the files, never fills the DRAM tier
    d = decide(plan, residency={}, holdings=fill, settings=Settings(verify=True))
    assert set(_sources(d)) == {"direct"}


@pytest.mark.parametrize(
    ("direct", "buffered", "mixed", "best"),
    [
        (0.9, 1.4, 1.2, "buffered"),
        (1.8, 1.2, 1.5, "direct"),
        (1.0, 1.0, 1.6, "mixed"),
        (1.0, 1.03, 0.5, "direct"),  # within 5%: not worth leaving O_DIRECT
        (0.0, 0.0, 0.0, "direct"),  # nothing measured
        (0.0, 1.1, 0.0, "buffered"),  # O_DIRECT refused by the filesystem
    ],
)
def test_profile_best(direct: float, buffered: float, mixed: float, best: str) -> None:
    prof = ReadProfile("k", "ext4", direct, buffered, mixed)
    assert prof.best == best
    assert read_mode(prof) == best
    assert prof.as_dict()["best"] == best


def test_forced_read_mode_and_bad_values() -> None:
    assert read_mode(PROFILE_DIRECT, "buffered") == "buffered"
    with pytest.raises(ValueError, match="read_mode"):
        read_mode(None, "fast")
    with pytest.raises(ValueError, match="byte source"):
        Decision(0, "cpu", 0, "teleport")


def test_fill_mode_and_slow_sources() -> None:
    assert fill_mode(0.9, PROFILE_DIRECT) == "page-cache-read"
    assert fill_mode(0.0, PROFILE_BUFFERED) == "buffered"
    assert is_slow_source("safetensors", "ext4")
    assert not is_slow_source("fastckpt", "xfs")
    assert is_slow_source("fastckpt", "nfs4")
    assert is_slow_source("fastckpt", "fuse.s3fs")


def test_mixed_split_is_page_aligned_inside_the_range() -> None:
    for lo, hi in [(0, 1 << 20), (4096, 10_000_000), (0, 4096)]:
        cut = mixed_split(lo, hi)
        assert cut % 4096 == 0 and lo <= cut <= hi


def test_summary() -> None:
    plan = _plan(("cpu", 0, 4096), ("cpu", 1, 0), ("cpu", 2, 4096))
    d = decide(plan, residency={0: 1.0})
    assert summary(d) == "direct+page-cache-map"
    assert summary(()) == "none"


def test_policy_and_tiering_import_neither_torch_nor_core() -> None:
    code = (
        "import sys, fastckpt.loader.policy, fastckpt.loader.tiering; "
        "bad = [m for m in ('torch', 'fastckpt._core') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
