"""Fitting, persistence and online refinement of the machine profile."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from fastckpt.sched import (
    MachineProfile,
    Sample,
    SchedError,
    TierProfile,
    fit_tier,
    observations_to_converge,
)
from fastckpt.sched.profile import ALPHA, MAX_BANDWIDTH_BPS, profile_from_fits, replay

GB = 10**9


def _line(nbytes: int, bw: float = 2 * GB, overhead: float = 0.05) -> Sample:
    return Sample(nbytes, overhead + nbytes / bw)


def test_fit_recovers_exact_line_and_discards_warmup() -> None:
    # the warm-up load is 10x slow; repeats of one size reduce to their median
    samples = [Sample(GB, 5.0), _line(GB), _line(2 * GB), _line(4 * GB), Sample(2 * GB, 9.0)]
    samples += [_line(2 * GB), _line(2 * GB)]
    fit = fit_tier(samples, warmup=1)
    assert fit.bandwidth_bps == pytest.approx(2 * GB, rel=1e-9)
    assert fit.overhead_s == pytest.approx(0.05, rel=1e-9)
    assert fit.discarded == 1 and fit.used == 6 and fit.sizes == (GB, 2 * GB, 4 * GB)
    assert fit.max_rel_residual == pytest.approx(0.0, abs=1e-9)


def test_fit_clamps_negative_overhead() -> None:
    fit = fit_tier([Sample(GB, 0.4), Sample(2 * GB, 1.0)], warmup=0)
    assert fit.overhead_s == 0.0
    # through the origin, weights 1/y^2: slope = sum(x/y) / sum(x^2/y^2)
    xs, ys = (GB, 2 * GB), (0.4, 1.0)
    slope = sum(x / y for x, y in zip(xs, ys, strict=True)) / sum(
        (x / y) ** 2 for x, y in zip(xs, ys, strict=True)
    )
    assert fit.bandwidth_bps == pytest.approx(1 / slope)


def test_fit_rejects_bad_samples() -> None:
    with pytest.raises(SchedError, match="2 different sizes"):
        fit_tier([_line(GB), _line(GB), _line(GB)], warmup=1)
    with pytest.raises(SchedError, match="invalid calibration sample"):
        fit_tier([_line(GB), Sample(2 * GB, 0.0)], warmup=0)


def test_fit_without_size_dependence_is_overhead_at_the_bandwidth_cap() -> None:
    fit = fit_tier([Sample(GB, 2.0), Sample(2 * GB, 1.0)], warmup=0)
    assert fit.bandwidth_bps == pytest.approx(MAX_BANDWIDTH_BPS)
    # weights 1/y^2: weighted mean of (2, 1) with weights (1/4, 1)
    assert fit.overhead_s == pytest.approx((2 / 4 + 1) / (1 / 4 + 1))


def _profile(bw: float = 2 * GB) -> MachineProfile:
    fits = {"dram": fit_tier([_line(GB, bw), _line(3 * GB, bw)], warmup=0)}
    return profile_from_fits("cpu", fits, host="h")


def test_profile_json_roundtrip_and_errors(tmp_path) -> None:
    prof = _profile().observe("dram", GB, 1.0)
    path = prof.save(tmp_path / "sub" / "sched-profile.json")
    again = MachineProfile.load(path)
    assert again == prof
    assert again.tier("dram").observations == 1
    assert json.loads(path.read_text())["version"] == 1
    path.write_text("{not json")
    with pytest.raises(SchedError, match="not valid JSON"):
        MachineProfile.load(path)
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(SchedError, match="version 99"):
        MachineProfile.load(path)
    path.write_text(json.dumps({"version": 1, "tiers": {"dram": {"bandwidth_bps": -1}}}))
    with pytest.raises(SchedError, match="bandwidth"):
        MachineProfile.load(path)
    with pytest.raises(SchedError, match="calibrate"):
        MachineProfile.load(tmp_path / "absent.json")
    with pytest.raises(SchedError, match="not in the profile"):
        prof.tier("nvme")


def test_observe_stats_uses_loadstats_fields() -> None:
    class Stats:  # the two LoadStats fields the profile reads
        nbytes = GB
        seconds = 0.05 + GB / (1 * GB)

    prof = _profile().observe_stats("dram", Stats())
    t = prof.tier("dram")
    assert t.observations == 1
    # log-space EWMA: per-byte time moves ALPHA of the way (in log) towards the observation
    expect = math.exp((1 - ALPHA) * math.log(1 / (2 * GB)) + ALPHA * math.log(1 / GB))
    assert 1 / t.bandwidth_bps == pytest.approx(expect)


def test_observation_within_overhead_is_counted_not_used() -> None:
    t = _profile().tier("dram").observe(GB, 0.01)
    assert t.ignored_observations == 1 and t.observations == 0
    assert t.bandwidth_bps == pytest.approx(2 * GB)


@pytest.mark.parametrize("ratio", [0.5, 0.1, 2.0, 10.0])
def test_converges_monotonically_within_stated_observations(ratio: float) -> None:
    t0 = _profile().tier("dram")
    new_bw = t0.bandwidth_bps * ratio
    n = observations_to_converge(ratio)
    obs = [_line(4 * GB, new_bw, t0.overhead_s) for _ in range(n + 5)]
    seq = [t0, *replay(t0, obs)]
    errs = [abs(math.log(p.bandwidth_bps / new_bw)) for p in seq]
    assert all(a >= b for a, b in itertools.pairwise(errs))  # no overshoot, no oscillation
    assert errs[n] <= math.log(1.05) + 1e-12
    assert errs[n - 1] > math.log(1.05)  # the stated count is the first that suffices
    assert n == {0.5: 6, 2.0: 6, 0.1: 8, 10.0: 8}[ratio]


def test_converges_under_noise_after_a_drop() -> None:
    rng = random.Random(3)
    t0 = _profile().tier("dram")
    new_bw = t0.bandwidth_bps / 3
    sizes = [GB, 2 * GB, 4 * GB]
    obs = [
        Sample(s, (t0.overhead_s + s / new_bw) * rng.uniform(0.9, 1.1))
        for s in (rng.choice(sizes) for _ in range(60))
    ]
    seq = replay(t0, obs)
    n = observations_to_converge(3.0, tolerance=0.10)
    tail = [abs(p.bandwidth_bps / new_bw - 1) for p in seq[n + 2 :]]
    assert max(tail) < 0.12  # noise of +-10% stays bounded, never swings back to the old value
    assert all(p.bandwidth_bps < t0.bandwidth_bps * 0.6 for p in seq[n:])


def test_tier_profile_rejects_bad_observation() -> None:
    t: TierProfile = _profile().tier("dram")
    with pytest.raises(SchedError):
        t.observe(-1, 1.0)
    with pytest.raises(SchedError):
        t.observe(1, float("nan"))


def test_refine_saved_profile_through_loadstats_shape(tmp_path) -> None:
    from fastckpt.sched.profile import refine_saved

    class Stats:
        nbytes = 4 * GB
        seconds = 0.05 + 4 * GB / GB  # the tier got twice as slow

    path = _profile().save(tmp_path / "p.json")
    for _ in range(observations_to_converge(2.0)):
        refine_saved("dram", Stats(), path)
    t = MachineProfile.load(path).tier("dram")
    assert t.observations == observations_to_converge(2.0)
    assert t.bandwidth_bps == pytest.approx(GB, rel=0.05)
    assert t.calibrated_bandwidth_bps == pytest.approx(2 * GB)
