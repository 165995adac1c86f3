"""The policy on its own: made-up plans, residencies, holdings and profiles in, decisions out.
No torch, no files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastckpt.loader.plan import BufferPlan, LoadPlan
from fastckpt.loader.policy import (
    Decision,
    DramAction,
    Facts,
    LoadDecision,
    ReadProfile,
    Settings,
    Source,
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


def _sources(decisions: LoadDecision) -> list[str]:
    return [d.source.value for d in decisions]


PROFILE_BUFFERED = ReadProfile(
    "8-1-ext4", "ext4", direct_gbps=0.9, buffered_gbps=1.4, source="probe"
)
PROFILE_DIRECT = ReadProfile("8-1-ext4", "ext4", direct_gbps=1.8, buffered_gbps=1.2, source="probe")


def test_page_cache_thresholds_cpu() -> None:
    plan = _plan(("cpu", 0, 4096), ("cpu", 1, 4096), ("cpu", 2, 4096), ("cpu", 3, 0))
    d = decide(plan, Facts(residency={0: 1.0, 1: 0.6, 2: 0.1, 3: 1.0}, profile=PROFILE_DIRECT))
    assert _sources(d) == ["page-cache-map", "page-cache-read", "direct", "empty"]
    assert [x.tier for x in d] == ["page-cache", "page-cache", "disk", "none"]


def test_mapping_off_or_verify_reads_instead() -> None:
    plan = _plan(("cpu", 0, 4096))
    warm = Facts(residency={0: 1.0})
    assert _sources(decide(plan, warm, Settings(cpu_map_cached=False))) == ["page-cache-read"]
    assert _sources(decide(plan, warm, Settings(verify=True))) == ["page-cache-read"]


def test_gpu_buffers_never_map() -> None:
    plan = _plan(("cuda:0", 0, 4096))
    assert _sources(decide(plan, Facts(residency={0: 1.0}))) == ["page-cache-read"]


def test_cold_mode_follows_the_profile() -> None:
    plan = _plan(("cpu", 0, 4096), ("cuda:0", 1, 4096))
    assert set(_sources(decide(plan, Facts(profile=PROFILE_BUFFERED)))) == {"buffered"}
    assert set(_sources(decide(plan, Facts(profile=PROFILE_DIRECT)))) == {"direct"}
    assert set(_sources(decide(plan, Facts(profile=None)))) == {"direct"}
    forced = Settings(read_mode="mixed")
    assert set(_sources(decide(plan, Facts(profile=PROFILE_BUFFERED), forced))) == {"mixed"}


def test_tiers_come_first() -> None:
    plan = _plan(("cuda:0", 0, 4096), ("cuda:1", 0, 4096), ("cpu", 1, 4096))
    held = Facts(residency={0: 1.0, 1: 1.0}, gpu_devices=frozenset({"cuda:0"}), dram=True)
    d = decide(plan, held)
    assert _sources(d) == ["gpu-tier", "dram-tier", "dram-tier"]
    assert d.dram is DramAction.USE
    fill = decide(plan, Facts(dram_can_fill=True, profile=PROFILE_BUFFERED))
    assert set(_sources(fill)) == {"dram-tier"}
    assert fill.dram is DramAction.FILL
    # what each buffer reads if the fill leaves nothing to serve from: decided in the same call
    assert [d.fallback for d in fill] == [Source.BUFFERED] * 3
    assert set(_sources(fill.without_dram())) == {"buffered"}
    # verification reads the files, never fills the DRAM tier
    d = decide(plan, Facts(dram_can_fill=True), Settings(verify=True))
    assert set(_sources(d)) == {"direct"} and d.dram is DramAction.NONE


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
        Decision(0, "cpu", 0, "teleport")  # type: ignore[arg-type]


def test_fill_mode_and_slow_sources() -> None:
    assert fill_mode(0.9, PROFILE_DIRECT) is Source.PAGE_CACHE_READ
    assert fill_mode(0.0, PROFILE_BUFFERED) is Source.BUFFERED
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
    d = decide(plan, Facts(residency={0: 1.0}))
    assert summary(d) == "direct+page-cache-map"
    assert summary(()) == "none"


def test_policy_and_tiering_import_neither_torch_nor_core() -> None:
    code = (
        "import sys, fastckpt.loader.policy, fastckpt.loader.tiering; "
        "bad = [m for m in ('torch', 'fastckpt._core') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_daemon_copies_come_before_files_and_before_a_fill() -> None:
    plan = _plan(("cpu", 0, 4096), ("cuda:0", 1, 4096))
    d = decide(plan, Facts(residency={0: 1.0}, daemon=True, dram_can_fill=True))
    assert _sources(d) == ["daemon", "daemon"]
    assert d.dram is DramAction.NONE  # the daemon holds it for the machine: no second copy
    # verification still takes the daemon's sealed bytes (and checks them)
    assert _sources(decide(plan, Facts(daemon=True), Settings(verify=True))) == [
        "daemon",
        "daemon",
    ]
    # its own DRAM tier (already holding it) and the GPU tier come first
    held = Facts(daemon=True, dram=True, gpu_devices=frozenset({"cuda:0"}))
    assert _sources(decide(plan, held)) == ["dram-tier", "gpu-tier"]
    fallback = decide(plan, Facts(residency={0: 1.0, 1: 1.0}))
    assert _sources(decide(plan, Facts(daemon=True)).without_daemon(fallback)) == [
        "page-cache-map",
        "page-cache-read",
    ]


MAPPING_WINS = ReadProfile("8-1-ext4", "ext4", 0.9, 1.2, 1.0, map_gbps=1.4, source="probe")


def test_a_cold_cpu_buffer_is_mapped_where_mapping_measured_fastest() -> None:
    plan = _plan(("cpu", 0, 4096), ("cuda:0", 1, 4096))
    d = decide(plan, Facts(profile=MAPPING_WINS))
    # the device buffer never maps: it takes the fastest read
    assert _sources(d) == ["map", "buffered"]
    assert MAPPING_WINS.best_cpu == "map" and MAPPING_WINS.best == "buffered"
    # not when mapping is off (private copies) or when verifying (reads what it checks)
    assert _sources(decide(plan, Facts(profile=MAPPING_WINS), Settings(cpu_map_cached=False))) == [
        "buffered",
        "buffered",
    ]
    assert _sources(decide(plan, Facts(profile=MAPPING_WINS), Settings(verify=True)))[0] == (
        "buffered"
    )
    # a mapping within 5% of the best read is not worth it
    close = ReadProfile("k", "ext4", 0.9, 1.4, 1.0, map_gbps=1.45)
    assert close.best_cpu == "buffered"


def test_sources_know_their_properties() -> None:
    assert Source.DAEMON.tier == "daemon" and Source.DAEMON.maps_on_cpu
    assert not Source.DAEMON.from_files
    assert Source.MAP.from_files and Source.MAP.maps_on_cpu and Source.MAP.tier == "disk"
    assert Source.DIRECT.direct_at((0, 1 << 20), 0)
    assert not Source.BUFFERED.direct_at((0, 1 << 20), 0)
    assert Source.MIXED.direct_at((0, 1 << 20), 1 << 19)
    assert not Source.MIXED.direct_at((0, 1 << 20), 0)
