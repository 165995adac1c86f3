"""Machine profile: fitted bandwidth and overhead per tier, persisted as JSON, refined online.

Fitting (``fit_tier``): loads of a few sizes, in measurement order. The first ``warmup`` loads are
discarded (first-use costs: engine start, page-table setup, lazy imports); repeats of one size are
reduced to their median; then ``seconds = overhead_s + nbytes / bandwidth_bps`` is fitted by least
squares on relative error (weights 1/seconds^2, so small and large loads count alike). A negative
intercept is clamped to 0 and the slope refitted through the origin; a negative slope (load time
not measurably growing with size) is clamped to ``MAX_BANDWIDTH_BPS``.

Online refinement (``TierProfile.observe``): each observed load gives a per-byte time
``(seconds - overhead_s) / nbytes``; the estimate moves towards it by an exponentially weighted
average in log space with weight ``ALPHA``. A step change of the bandwidth by a factor ``r`` is then
followed monotonically (no overshoot, hence no oscillation) and the remaining error after ``n``
noise-free observations is ``r ** ((1 - ALPHA) ** n)`` - 1: with ``ALPHA = 0.4`` within 5% after 6
observations for r = 2, after 8 for r = 10 (``observations_to_converge``). Observations no longer
than the overhead carry no bandwidth information and are counted but not used; the overhead
itself is kept from calibration.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastckpt.sched.model import SchedError, TierSpeed

PROFILE_VERSION = 1
ALPHA = 0.4
#: Fitted bandwidths are capped here (10 TB/s): beyond it the size of a load is not measurable
#: against its fixed overhead (e.g. mapping page-cached files without copying).
MAX_BANDWIDTH_BPS = 1e13


def observations_to_converge(ratio: float, tolerance: float = 0.05, alpha: float = ALPHA) -> int:
    """Noise-free observations after a bandwidth change by ``ratio`` until within ``tolerance``."""
    if ratio <= 0 or tolerance <= 0 or not 0 < alpha < 1:
        raise SchedError("ratio, tolerance must be > 0 and alpha in (0, 1)")
    err = abs(math.log(ratio))
    goal = math.log1p(tolerance)
    if err <= goal:
        return 0
    return math.ceil(math.log(goal / err) / math.log(1 - alpha))


@dataclass(frozen=True)
class Sample:
    """One measured load: bytes delivered and the wall time it took."""

    nbytes: int
    seconds: float


@dataclass(frozen=True)
class TierFit:
    """Result of fitting one tier, with what went into it."""

    bandwidth_bps: float
    overhead_s: float
    used: int
    discarded: int
    sizes: tuple[int, ...]
    max_rel_residual: float


def fit_tier(samples: Sequence[Sample], *, warmup: int = 1) -> TierFit:
    """Fit ``seconds = overhead_s + nbytes / bandwidth_bps`` (see the module docstring)."""
    if warmup < 0:
        raise SchedError("warmup must be >= 0")
    kept = list(samples[warmup:])
    for s in kept:
        if s.nbytes <= 0 or not s.seconds > 0 or math.isinf(s.seconds):
            raise SchedError(f"invalid calibration sample {s}: bytes and seconds must be > 0")
    by_size: dict[int, list[float]] = {}
    for s in kept:
        by_size.setdefault(s.nbytes, []).append(s.seconds)
    if len(by_size) < 2:
        raise SchedError(
            f"need loads of at least 2 different sizes after discarding {warmup} warm-up "
            f"load(s); got sizes {sorted(by_size)}"
        )
    xs = sorted(by_size)
    ys = [statistics.median(by_size[x]) for x in xs]
    ws = [1.0 / (y * y) for y in ys]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs, strict=True))
    sy = sum(w * y for w, y in zip(ws, ys, strict=True))
    sxx = sum(w * x * x for w, x in zip(ws, xs, strict=True))
    sxy = sum(w * x * y for w, x, y in zip(ws, xs, ys, strict=True))
    det = sw * sxx - sx * sx
    # Non-negative least squares in two unknowns: the unconstrained solution if both are >= 0,
    # else the better of "no overhead" (through the origin) and "no size dependence".
    cands: list[tuple[float, float]] = []
    slope = (sw * sxy - sx * sy) / det
    intercept = (sy - slope * sx) / sw
    if slope > 0 and intercept >= 0:
        cands.append((intercept, slope))
    else:
        cands.append((0.0, sxy / sxx))
        cands.append((sy / sw, 0.0))

    def sse(c: tuple[float, float]) -> float:
        return sum(w * (c[0] + c[1] * x - y) ** 2 for w, x, y in zip(ws, xs, ys, strict=True))

    intercept, slope = min(cands, key=sse)
    # no measurable size dependence: report the bandwidth cap rather than an infinite one
    slope = max(slope, 1.0 / MAX_BANDWIDTH_BPS)
    worst = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys, strict=True))
    return TierFit(1.0 / slope, intercept, len(kept), min(warmup, len(samples)), tuple(xs), worst)


@dataclass(frozen=True)
class TierProfile:
    """Bandwidth and overhead of one tier on this machine, and how they were obtained."""

    name: str
    bandwidth_bps: float
    overhead_s: float
    calibrated_bandwidth_bps: float
    samples: int = 0
    observations: int = 0
    ignored_observations: int = 0
    updated: float = field(default=0.0, compare=False)

    def speed(self) -> TierSpeed:
        return TierSpeed(self.name, self.bandwidth_bps, self.overhead_s)

    def predict_s(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / self.bandwidth_bps

    def observe(self, nbytes: int, seconds: float, *, alpha: float = ALPHA) -> TierProfile:
        """This profile refined by one observed load (a new object; see the module docstring)."""
        if nbytes < 0 or not seconds >= 0 or math.isinf(seconds):
            raise SchedError(f"invalid observation: {nbytes} bytes in {seconds} s")
        transfer = seconds - self.overhead_s
        if nbytes == 0 or transfer <= 0:
            return replace(self, ignored_observations=self.ignored_observations + 1)
        log_now = math.log(1.0 / self.bandwidth_bps)
        log_obs = math.log(transfer / nbytes)
        per_byte = math.exp((1 - alpha) * log_now + alpha * log_obs)
        return replace(
            self,
            bandwidth_bps=1.0 / per_byte,
            observations=self.observations + 1,
            updated=time.time(),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "bandwidth_bps": self.bandwidth_bps,
            "overhead_s": self.overhead_s,
            "calibrated_bandwidth_bps": self.calibrated_bandwidth_bps,
            "samples": self.samples,
            "observations": self.observations,
            "ignored_observations": self.ignored_observations,
            "updated": self.updated,
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> TierProfile:
        try:
            bw = float(data["bandwidth_bps"])
            tp = cls(
                name=name,
                bandwidth_bps=bw,
                overhead_s=float(data.get("overhead_s", 0.0)),
                calibrated_bandwidth_bps=float(data.get("calibrated_bandwidth_bps", bw)),
                samples=int(data.get("samples", 0)),
                observations=int(data.get("observations", 0)),
                ignored_observations=int(data.get("ignored_observations", 0)),
                updated=float(data.get("updated", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SchedError(f"tier {name!r} in the profile is malformed: {exc}") from None
        tp.speed()  # validates bandwidth and overhead
        return tp


@dataclass(frozen=True)
class MachineProfile:
    """Every calibrated tier of one machine, for one load target (``cpu`` or ``cuda``)."""

    device: str
    tiers: Mapping[str, TierProfile]
    host: str = ""
    created: float = 0.0

    def tier(self, name: str) -> TierProfile:
        try:
            return self.tiers[name]
        except KeyError:
            raise SchedError(
                f"tier {name!r} is not in the profile (has: {sorted(self.tiers)})"
            ) from None

    def speeds(self) -> tuple[TierSpeed, ...]:
        return tuple(self.tiers[k].speed() for k in sorted(self.tiers))

    def with_tier(self, tier: TierProfile) -> MachineProfile:
        return replace(self, tiers={**self.tiers, tier.name: tier})

    def observe(self, tier: str, nbytes: int, seconds: float) -> MachineProfile:
        """This profile refined by one observed load from ``tier``."""
        return self.with_tier(self.tier(tier).observe(nbytes, seconds))

    def observe_stats(self, tier: str, stats: Any) -> MachineProfile:
        """Refine from a ``fastckpt.LoadStats`` (uses its ``nbytes`` and ``seconds``)."""
        return self.observe(tier, int(stats.nbytes), float(stats.seconds))

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "kind": "fastckpt.sched profile",
            "device": self.device,
            "host": self.host,
            "created": self.created,
            "tiers": {k: self.tiers[k].as_dict() for k in sorted(self.tiers)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MachineProfile:
        if not isinstance(data, Mapping) or data.get("version") != PROFILE_VERSION:
            got = data.get("version") if isinstance(data, Mapping) else type(data).__name__
            raise SchedError(f"not a version {PROFILE_VERSION} sched profile (version {got!r})")
        tiers = data.get("tiers")
        if not isinstance(tiers, Mapping) or not tiers:
            raise SchedError("the profile has no tiers")
        return cls(
            device=str(data.get("device", "cpu")),
            tiers={str(k): TierProfile.from_dict(str(k), v) for k, v in tiers.items()},
            host=str(data.get("host", "")),
            created=float(data.get("created", 0.0)),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + rename), creating the directory."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sched-profile.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.as_dict(), fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MachineProfile:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise SchedError(
                f"no sched profile at {str(p)!r}: run `fastckpt calibrate` first"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchedError(f"sched profile {str(p)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def profile_from_fits(
    device: str, fits: Mapping[str, TierFit], *, host: str = ""
) -> MachineProfile:
    now = time.time()
    return MachineProfile(
        device=device,
        tiers={
            name: TierProfile(
                name=name,
                bandwidth_bps=f.bandwidth_bps,
                overhead_s=f.overhead_s,
                calibrated_bandwidth_bps=f.bandwidth_bps,
                samples=f.used,
                updated=now,
            )
            for name, f in fits.items()
        },
        host=host,
        created=now,
    )


def replay(profile: TierProfile, observations: Iterable[Sample]) -> list[TierProfile]:
    """The successive profiles after each observation (for analysis and tests)."""
    out = []
    for s in observations:
        profile = profile.observe(s.nbytes, s.seconds)
        out.append(profile)
    return out


def refine_saved(
    tier: str, stats: Any, path: str | os.PathLike[str] | None = None
) -> MachineProfile:
    """Refine the saved machine profile from one observed load and save it back.

    ``stats`` is a ``fastckpt.LoadStats`` (or anything with ``nbytes`` and ``seconds``); ``path``
    defaults to the profile ``fastckpt calibrate`` writes. Returns the refined profile.
    """
    from fastckpt.config import sched_profile_path

    target = Path(path) if path is not None else Path(sched_profile_path())
    refined = MachineProfile.load(target).observe_stats(tier, stats)
    refined.save(target)
    return refined
