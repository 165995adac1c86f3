"""Calibration machinery: a measuring seam (fake and fastckpt's own load), the CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastckpt.sched import MachineProfile, SchedError
from fastckpt.sched.calibrate import (
    calibrate,
    fastckpt_load_fn,
    measure_tier,
    write_checkpoints,
)

MiB = 1 << 20


def test_measure_tier_with_a_fake_loader_discards_warmup_and_interleaves() -> None:
    sizes = {"a": 10 * MiB, "b": 20 * MiB, "c": 40 * MiB}
    calls: list[str] = []

    def load(path: str) -> tuple[int, float]:
        calls.append(path)
        slow = 5.0 if len(calls) <= 3 else 1.0  # first round: cold-start costs
        return sizes[path], slow * (0.01 + sizes[path] / 1e9)

    run = measure_tier("dram", load, ["a", "b", "c"], repeats=2, prepare=calls.append)
    # prepare runs before each load; rounds alternate direction
    assert calls[1::2] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert run.warmup == 3 and run.fit.used == 6
    assert run.fit.bandwidth_bps == pytest.approx(1e9)
    assert run.fit.overhead_s == pytest.approx(0.01)


def test_calibrate_rejects_unknown_tier_and_single_checkpoint() -> None:
    with pytest.raises(SchedError, match="prepare tier"):
        calibrate(lambda p: (1, 1.0), ["a", "b"], tiers=["tape"])
    with pytest.raises(SchedError, match="at least 2 checkpoints"):
        measure_tier("dram", lambda p: (1, 1.0), ["a", "a"])


def test_calibrate_through_fastckpt_load_on_tiny_checkpoints(tmp_path) -> None:
    # checks the machinery end to end (real loads, real page-cache eviction); no timing asserts
    ckpts = write_checkpoints(str(tmp_path), [1 * MiB, 2 * MiB, 3 * MiB])
    profile, runs = calibrate(fastckpt_load_fn("cpu"), ckpts, repeats=1)
    assert sorted(profile.tiers) == ["disk", "dram"]
    for run in runs:
        assert [s.nbytes for s in run.samples[:3]] == [1 * MiB, 2 * MiB, 3 * MiB]
        assert run.fit.bandwidth_bps > 0 and run.fit.overhead_s >= 0
        assert run.fit.used == 3 and run.fit.discarded == 3
    saved = MachineProfile.load(profile.save(tmp_path / "p.json"))
    assert saved.tier("disk").samples == 3


def _cli(*args: str, env_profile: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "FASTCKPT_SCHED_PROFILE": env_profile}
    return subprocess.run(
        [sys.executable, "-m", "fastckpt.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_calibrate_then_estimate(tmp_path) -> None:
    prof = str(tmp_path / "cache" / "sched-profile.json")
    missing = _cli("estimate", str(tmp_path), env_profile=prof)
    assert missing.returncode == 1 and "fastckpt calibrate" in missing.stderr
    bad = _cli("calibrate", "--sizes", "1", env_profile=prof)
    assert bad.returncode == 1 and "--sizes" in bad.stderr
    done = _cli("calibrate", "--sizes", "1,2", "--repeats", "1", env_profile=prof)
    assert done.returncode == 0, done.stderr
    assert "dram" in done.stdout and "disk" in done.stdout and prof in done.stdout
    profile = MachineProfile.load(prof)
    ckpt = write_checkpoints(str(tmp_path), [4 * MiB])[0]
    est = _cli("estimate", ckpt, "--json", env_profile=prof)
    assert est.returncode == 0, est.stderr
    out = json.loads(est.stdout)
    by_tier = {e["tier"]: e for e in out["estimates"]}
    assert set(by_tier) == {"dram", "disk"}
    for name, e in by_tier.items():
        t = profile.tier(name)
        assert e["transfer_s"] == pytest.approx(4 * MiB / t.bandwidth_bps)
        assert e["total_s"] == pytest.approx(t.overhead_s + 4 * MiB / t.bandwidth_bps)
    text = _cli("estimate", ckpt, env_profile=prof)
    assert text.returncode == 0 and "overhead" in text.stdout
