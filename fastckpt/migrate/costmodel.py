"""Recompute (prefill) cost model: seconds to prefill n tokens, fitted from measurements.

``t(n) = c0 + c1 * n + c2 * n**2`` (seconds). The quadratic term is attention: its work grows
with the square of the context, so a linear fit underestimates long contexts. The model is plain
data: ``to_dict()`` gives JSON-able numbers that any estimator can evaluate without importing this
package; ``from_dict`` reads them back. Format (``kind`` names it; a new major means a new
formula)::

    {
      "kind": "fastckpt.recompute_cost", "version": 1,
      "c0_s": float, "c1_s_per_token": float, "c2_s_per_token2": float,
      "min_tokens": int, "max_tokens": int,        # range the fit saw
      "held_out": {"points": int, "mean_abs_rel_err": float, "max_abs_rel_err": float} | null,
      "engine": str, "device": str, "dtype": str   # what was measured (free text)
    }

``predict_migration`` uses the model to predict rounds, downtime and total time of a migration,
the same loop as ``fastckpt.migrate.driver`` but with times instead of engines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

KIND = "fastckpt.recompute_cost"
VERSION = 1


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a small square system."""
    m = [[*row, bi] for row, bi in zip(a, b, strict=True)]
    n = len(m)
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            raise ValueError("the fit is singular: measure at least three distinct token counts")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


@dataclass(frozen=True)
class HeldOutError:
    points: int
    mean_abs_rel_err: float
    max_abs_rel_err: float


@dataclass(frozen=True)
class RecomputeCostModel:
    """Prefill seconds for n tokens on one engine/device/dtype (see the module docstring)."""

    c0_s: float
    c1_s_per_token: float
    c2_s_per_token2: float
    min_tokens: int = 0
    max_tokens: int = 0
    held_out: HeldOutError | None = None
    engine: str = ""
    device: str = ""
    dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def predict_s(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` tokens onto an empty cache (never negative)."""
        if tokens <= 0:
            return 0.0
        n = float(tokens)
        return max(0.0, self.c0_s + self.c1_s_per_token * n + self.c2_s_per_token2 * n * n)

    def predict_chunk_s(self, cached: int, new: int) -> float:
        """Seconds to prefill ``new`` tokens after ``cached`` ones (a catch-up round).

        Linear work scales with ``new``; attention with ``new * (cached + new)``, i.e. the
        difference of the quadratic terms, plus one fixed cost.
        """
        if new <= 0:
            return 0.0
        quad = self.c2_s_per_token2 * ((cached + new) ** 2 - cached**2)
        return max(0.0, self.c0_s + self.c1_s_per_token * new + quad)

    def errors(self, points: Sequence[tuple[int, float]]) -> HeldOutError:
        """Relative errors of the model on measured ``(tokens, seconds)`` points."""
        if not points:
            raise ValueError("no points to evaluate")
        rel = [abs(self.predict_s(n) - t) / t for n, t in points if t > 0]
        if not rel:
            raise ValueError("every measured time is zero")
        return HeldOutError(len(rel), sum(rel) / len(rel), max(rel))

    def with_held_out(self, points: Sequence[tuple[int, float]]) -> RecomputeCostModel:
        return replace(self, held_out=self.errors(points))

    def to_dict(self) -> dict[str, Any]:
        h = self.held_out
        return {
            "kind": KIND,
            "version": VERSION,
            "c0_s": self.c0_s,
            "c1_s_per_token": self.c1_s_per_token,
            "c2_s_per_token2": self.c2_s_per_token2,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "held_out": None
            if h is None
            else {
                "points": h.points,
                "mean_abs_rel_err": h.mean_abs_rel_err,
                "max_abs_rel_err": h.max_abs_rel_err,
            },
            "engine": self.engine,
            "device": self.device,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecomputeCostModel:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"not a recompute cost model: kind {d.get('kind')!r}, want {KIND!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"recompute cost model version {d.get('version')!r}, want {VERSION}")
        coefs = [d.get(k) for k in ("c0_s", "c1_s_per_token", "c2_s_per_token2")]
        if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefs):
            raise ValueError(f"recompute cost model coefficients must be finite numbers: {coefs}")
        h = d.get("held_out")
        return cls(
            c0_s=float(coefs[0]),  # type: ignore[arg-type]
            c1_s_per_token=float(coefs[1]),  # type: ignore[arg-type]
            c2_s_per_token2=float(coefs[2]),  # type: ignore[arg-type]
            min_tokens=int(d.get("min_tokens", 0)),
            max_tokens=int(d.get("max_tokens", 0)),
            held_out=None
            if h is None
            else HeldOutError(
                int(h["points"]), float(h["mean_abs_rel_err"]), float(h["max_abs_rel_err"])
            ),
            engine=str(d.get("engine", "")),
            device=str(d.get("device", "")),
            dtype=str(d.get("dtype", "")),
        )


def fit(
    points: Sequence[tuple[int, float]], *, nonnegative: bool = True, **meta: str
) -> RecomputeCostModel:
    """Least-squares fit of ``c0 + c1 n + c2 n^2`` to ``(tokens, seconds)`` points.

    Rows are weighted by 1/seconds so that the fit minimises *relative* error (short prefills
    count as much as long ones). Needs at least three distinct token counts.

    With ``nonnegative`` (the default) every coefficient is at least 0: a fixed cost, a cost per
    token and a cost per token pair cannot be negative, and a negative one (noise can make the
    plain fit put a small negative intercept or curvature) would predict negative times outside
    the measured range, and the startup-time estimator refuses it. The constrained optimum is
    found exactly: the best plain fit over each set of coefficients allowed to be non-zero,
    keeping the best whose coefficients are all non-negative.
    """
    pts = [(int(n), float(t)) for n, t in points]
    if len({n for n, _ in pts}) < 3:
        raise ValueError("fit needs at least three distinct token counts")
    if any(t <= 0 for _, t in pts):
        raise ValueError("measured times must be positive")
    scale = max(n for n, _ in pts)  # condition the normal equations
    # weighted rows: minimise sum((c0 + c1 x + c2 x^2) / t - 1)^2 with x = n / scale
    rows = [[1.0 / t, (n / scale) / t, (n / scale) ** 2 / t] for n, t in pts]

    def solve(free: tuple[int, ...]) -> tuple[list[float], float]:
        ata = [[sum(r[i] * r[j] for r in rows) for j in free] for i in free]
        atb = [sum(r[i] for r in rows) for i in free]
        coef = [0.0, 0.0, 0.0]
        for k, v in zip(free, _solve(ata, atb), strict=True):
            coef[k] = v
        resid = sum((sum(c * x for c, x in zip(coef, r, strict=True)) - 1.0) ** 2 for r in rows)
        return coef, resid

    best, _ = solve((0, 1, 2))
    if nonnegative and min(best) < 0:
        subsets = [(0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
        feasible = [fitted for fitted in map(solve, subsets) if min(fitted[0]) >= 0]
        best = min(feasible, key=lambda f: f[1])[0]  # (c0 alone is always feasible)
    c0, c1, c2 = best
    return RecomputeCostModel(
        c0_s=c0,
        c1_s_per_token=c1 / scale,
        c2_s_per_token2=c2 / (scale * scale),
        min_tokens=min(n for n, _ in pts),
        max_tokens=max(n for n, _ in pts),
        engine=meta.get("engine", ""),
        device=meta.get("device", ""),
        dtype=meta.get("dtype", ""),
    )


@dataclass(frozen=True)
class MigrationPrediction:
    rounds: int
    tokens_per_round: tuple[int, ...]
    final_tokens: int
    downtime_s: float
    total_s: float
    finishes_on_source: bool = False  # the generation ends before the switch


def predict_migration(
    model: RecomputeCostModel,
    context_tokens: int,
    decode_tokens_per_s: float,
    *,
    threshold_tokens: int = 20,
    max_rounds: int = 8,
    remaining_tokens: int | None = None,
) -> MigrationPrediction:
    """Rounds, downtime and total time of migrating a generation of ``context_tokens`` tokens
    whose source decodes ``decode_tokens_per_s`` meanwhile (the driver's loop, in time).

    ``remaining_tokens`` (tokens the generation still has to make) caps the tokens the source
    adds; when they run out during the rounds the prediction says ``finishes_on_source``.
    Messaging and commit overheads are not modelled.
    """
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    if decode_tokens_per_s < 0:
        raise ValueError("decode_tokens_per_s must be >= 0")
    left = math.inf if remaining_tokens is None else float(remaining_tokens)
    covered = 0
    context = context_tokens
    per_round: list[int] = []
    elapsed = 0.0
    while True:
        gap = context - covered
        if len(per_round) >= max_rounds or (per_round and gap <= threshold_tokens):
            break
        dt = model.predict_chunk_s(covered, gap)
        per_round.append(gap)
        covered = context
        elapsed += dt
        made = min(left, math.floor(dt * decode_tokens_per_s))
        left -= made
        context += int(made)
        if left <= 0:
            return MigrationPrediction(len(per_round), tuple(per_round), 0, 0.0, elapsed, True)
    final = context - covered
    downtime = model.predict_chunk_s(covered, final)
    return MigrationPrediction(
        len(per_round), tuple(per_round), final, downtime, elapsed + downtime
    )


__all__ = [
    "KIND",
    "VERSION",
    "HeldOutError",
    "MigrationPrediction",
    "RecomputeCostModel",
    "fit",
    "predict_migration",
]
