"""The report's arithmetic and verdicts on hand-made results (no measurement involved)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fastckpt.bench import report

NBYTES = 1_000_000_000


def _m(loader: str, scenario: str, seconds: float | None, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "loader": loader,
        "scenario": scenario,
        "repeat": 0,
        "ok": seconds is not None,
        "seconds": seconds,
        "nbytes": NBYTES,
        "gbps": None if seconds is None else NBYTES / seconds / 1e9,
        "peak_rss_bytes": 900_000_000,
        "rss_delta_bytes": 100_000_000,
        "peak_device_bytes": None,
        "device_used_bytes": None,
        "bitwise": None,
        "mismatch": "",
        "error": "" if seconds is not None else "boom",
        "resident_before": 0.0,
        "wall_s": 1.0,
        "extra": {},
    }
    base.update(kw)
    return base


def _c(name: str, gbps: float) -> dict[str, Any]:
    return {
        "name": name,
        "repeat": 0,
        "nbytes": NBYTES,
        "seconds": 1 / gbps,
        "method": "m",
        "note": "",
        "gbps": gbps,
    }


def _data(
    device: str, measurements: list[dict[str, Any]], ceilings: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "options": {
            "device": device,
            "scenarios": ["cold", "warm", "tmpfs"],
            "loaders": ["fastckpt", "safetensors", "torch-mmap", "instanttensor"],
            "repeats": 3,
        },
        "machine": {"date": "d", "cpu_model": "cpu", "cpu_count": 2, "gpu": None},
        "checkpoint": {
            "nbytes": NBYTES,
            "tensors": 10,
            "safetensors_files": ["a", "b"],
            "description": {"hidden": 64, "layers": 2, "vocab": 256},
        },
        "loaders": {
            "fastckpt": {"label": "fastckpt", "available": True, "selected": True},
            "safetensors": {"label": "st", "available": True, "selected": True},
            "torch-mmap": {"label": "tm", "available": True, "selected": True},
            "instanttensor": {"available": False, "reason": "needs a CUDA device"},
        },
        "ceilings": ceilings,
        "measurements": measurements,
        "notes": ["a note"],
    }


def _cpu_data() -> dict[str, Any]:
    ms = [
        _m("fastckpt", "cold", 1.0, bitwise=True, extra={"load_stats": {"path_taken": "cpu-read"}}),
        _m("fastckpt", "cold", 3.0),
        _m("fastckpt", "cold", 2.0),
        _m("safetensors", "cold", 2.0, bitwise=True),
        _m("safetensors", "cold", 4.0),
        _m("torch-mmap", "cold", None),
        _m("fastckpt", "warm", 0.5, bitwise=False, mismatch="1 differ (e.g. x)"),
        _m("safetensors", "warm", 0.4),
        _m("torch-mmap", "warm", 0.8),
    ]
    ceilings = [
        _c("disk_direct", 0.8),
        _c("disk_direct", 1.2),
        _c("disk_buffered", 0.9),
        _c("pagecache_to_host", 10.0),
    ]
    return _data("cpu", ms, ceilings)


def test_summarize_cpu() -> None:
    rows = {(r.scenario, r.loader): r for r in report.summarize(_cpu_data())}
    fc = rows[("cold", "fastckpt")]
    assert (fc.median_s, fc.min_s, fc.max_s, fc.ok_runs, fc.runs) == (2.0, 1.0, 3.0, 3, 3)
    assert fc.gbps == pytest.approx(0.5)
    # cold ceiling: the better of O_DIRECT (median of 0.8, 1.2 = 1.0) and buffered (0.9)
    assert fc.ceiling == "disk O_DIRECT" and fc.ceiling_gbps == pytest.approx(1.0)
    assert fc.of_ceiling == pytest.approx(0.5)
    assert fc.vs_safetensors == pytest.approx(3.0 / 2.0)
    assert fc.bitwise == "OK" and fc.path_taken == "cpu-read"
    tm = rows[("cold", "torch-mmap")]
    assert tm.median_s is None and tm.ok_runs == 0 and tm.error == "boom"
    fw = rows[("warm", "fastckpt")]
    assert fw.bitwise == "FAIL" and "1 differ" in fw.error
    assert fw.ceiling == "page cache -> host" and fw.of_ceiling == pytest.approx(0.2)
    assert [r.loader for r in report.summarize(_cpu_data())][:3] == [
        "fastckpt",
        "safetensors",
        "torch-mmap",
    ]


def test_targets_cpu() -> None:
    data = _cpu_data()
    verdicts = {t[0]: t[2] for t in report.targets(data, report.summarize(data))}
    assert verdicts["fastckpt cold >= 90% of best sequential read"] == "MISSED"
    assert verdicts["fastckpt cold not slower than safetensors"] == "met"
    assert verdicts["fastckpt warm no slower than the fastest baseline (safetensors)"] == "MISSED"
    assert verdicts["fastckpt cold bitwise equal"] == "met"
    assert verdicts["fastckpt warm bitwise equal"] == "MISSED"


def test_targets_cuda_and_ceiling_is_slowest_stage() -> None:
    ms = [
        _m("fastckpt", "cold", 0.54),
        _m(
            "fastckpt",
            "warm",
            0.05,
            peak_device_bytes=2_000_000_000,
            device_used_bytes=2_100_000_000,
        ),
        _m("fastckpt", "tmpfs", 0.025),
        _m("instanttensor", "tmpfs", 0.02),
    ]
    ceilings = [_c("disk_direct", 1.8), _c("pagecache_to_host", 45.0), _c("pinned_to_gpu", 55.0)]
    data = _data("cuda:0", ms, ceilings)
    rows = {(r.scenario, r.loader): r for r in report.summarize(data)}
    assert rows[("warm", "fastckpt")].ceiling == "page cache -> pinned"
    assert rows[("warm", "fastckpt")].ceiling_gbps == 45.0
    assert rows[("warm", "fastckpt")].peak_device_bytes == 2_100_000_000
    verdicts = {t[0]: t[2] for t in report.targets(data, list(rows.values()))}
    assert verdicts["fastckpt cold >= 93% of O_DIRECT disk"] == "met"  # 1.85 GB/s vs 1.8
    assert verdicts["fastckpt warm >= 26 GB/s"] == "MISSED"  # 20 GB/s
    assert verdicts["fastckpt tmpfs >= 45 GB/s"] == "MISSED"  # 40 GB/s
    assert verdicts["fastckpt tmpfs faster than InstantTensor"] == "MISSED"


def test_write_all_and_rerender(tmp_path: Path) -> None:
    rows, paths = report.write_all(_cpu_data(), str(tmp_path))
    md = Path(paths["md"]).read_text()
    assert "| scenario | loader | median s |" in md
    assert "| cold | fastckpt | 2.000 | 0.50 | 1.000-3.000 | 50% (disk O_DIRECT) | 1.50x" in md
    assert "a note" in md and "instanttensor: needs a CUDA device" in md
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(Path(paths["json"]).read_text())
    assert len(saved["summary"]) == len(rows)
    out = tmp_path / "again"
    assert report.main([paths["json"], str(out)]) == 0
    assert (out / "results.md").read_text() == md
    assert report.main([]) == 2


def test_long_notes_are_cut_at_a_word_boundary() -> None:
    from fastckpt.bench.report import _engine_text

    reason = "io_uring unavailable: " + " ".join(f"word{i:03d}" for i in range(60))
    text = _engine_text({"name": "pread", "reason": reason})
    assert len(text) <= len("pread: ") + 160
    assert text.endswith("…")
    last = text[len("pread: ") : -1].split()[-1]
    assert last in reason.split(), f"{last!r} is a cut word"
