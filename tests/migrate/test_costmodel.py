"""Recompute cost model: fit, plain-data round trip, held-out error, migration prediction."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fastckpt.migrate.costmodel import RecomputeCostModel, fit, predict_migration

TRUE = RecomputeCostModel(c0_s=0.004, c1_s_per_token=2e-5, c2_s_per_token2=3e-9)


def test_fit_recovers_a_quadratic() -> None:
    pts = [(n, TRUE.predict_s(n)) for n in (16, 64, 128, 256, 512, 1024, 2048)]
    m = fit(pts, engine="e", device="cpu", dtype="float32")
    assert m.c0_s == pytest.approx(TRUE.c0_s, rel=1e-6)
    assert m.c1_s_per_token == pytest.approx(TRUE.c1_s_per_token, rel=1e-6)
    assert m.c2_s_per_token2 == pytest.approx(TRUE.c2_s_per_token2, rel=1e-6)
    assert (m.min_tokens, m.max_tokens, m.engine) == (16, 2048, "e")


def test_held_out_error_and_plain_data_round_trip() -> None:
    noisy = [
        (n, TRUE.predict_s(n) * (1.05 if i % 2 else 0.95))
        for i, n in enumerate(range(50, 2000, 150))
    ]
    m = fit(noisy[::2]).with_held_out(noisy[1::2])
    assert m.held_out is not None and m.held_out.points == len(noisy[1::2])
    assert 0 < m.held_out.mean_abs_rel_err <= m.held_out.max_abs_rel_err < 0.2
    d = json.loads(json.dumps(m.to_dict()))
    assert d["kind"] == "fastckpt.recompute_cost" and d["version"] == 1
    back = RecomputeCostModel.from_dict(d)
    assert back == m
    # an estimator that does not import fastckpt evaluates the same formula from the dict
    n = 1500
    plain = d["c0_s"] + d["c1_s_per_token"] * n + d["c2_s_per_token2"] * n * n
    assert plain == pytest.approx(m.predict_s(n))


def test_linear_fit_underestimates_long_contexts_where_quadratic_does_not() -> None:
    pts = [(n, TRUE.predict_s(n)) for n in (64, 256, 512, 1024)]
    quad = fit(pts)
    assert quad.predict_s(4096) == pytest.approx(TRUE.predict_s(4096), rel=1e-6)
    # a straight line through the two longest points misses the curvature beyond them
    slope = (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
    linear = pts[-1][1] + slope * (4096 - pts[-1][0])
    assert linear < TRUE.predict_s(4096)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"kind": "other"}, "kind"),
        ({"kind": "fastckpt.recompute_cost", "version": 9}, "version"),
        (
            {
                "kind": "fastckpt.recompute_cost",
                "version": 1,
                "c0_s": "x",
                "c1_s_per_token": 0,
                "c2_s_per_token2": 0,
            },
            "finite",
        ),
    ],
)
def test_from_dict_refuses_other_data(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecomputeCostModel.from_dict(bad)


def test_fit_needs_three_token_counts() -> None:
    with pytest.raises(ValueError, match="three"):
        fit([(10, 1.0), (10, 1.1), (20, 2.0)])
    with pytest.raises(ValueError, match="positive"):
        fit([(10, 1.0), (20, 0.0), (30, 2.0)])


def test_chunk_cost_adds_up_to_the_whole() -> None:
    whole = TRUE.predict_s(1000) - TRUE.c0_s
    parts = TRUE.predict_chunk_s(0, 600) + TRUE.predict_chunk_s(600, 400) - 2 * TRUE.c0_s
    assert parts == pytest.approx(whole)


def test_predict_migration_follows_the_driver_loop() -> None:
    m = RecomputeCostModel(c0_s=0.0, c1_s_per_token=0.001, c2_s_per_token2=0.0)
    # 1000 tokens take 1 s while the source makes 50; 50 take 0.05 s -> 2 tokens: freeze
    p = predict_migration(m, 1000, 50.0)
    assert p.tokens_per_round == (1000, 50) and p.final_tokens == 2
    assert p.downtime_s == pytest.approx(0.002) and p.total_s == pytest.approx(1.052)
    assert predict_migration(m, 1000, 50.0, max_rounds=0).final_tokens == 1000
    short = predict_migration(m, 1000, 50.0, remaining_tokens=10)
    assert short.finishes_on_source and short.tokens_per_round == (1000,)
    assert not predict_migration(m, 1000, 50.0, remaining_tokens=100).finishes_on_source
    fast = predict_migration(m, 1000, 5000.0, max_rounds=3)
    assert fast.rounds == 3 and fast.final_tokens > 20  # the cap, not the threshold, ended it


def test_fit_keeps_every_coefficient_nonnegative() -> None:
    """Noise that tilts the plain fit to a negative intercept: the default fit pins it at 0
    and is the best fit with non-negative coefficients."""
    truth = RecomputeCostModel(c0_s=0.0, c1_s_per_token=4e-5, c2_s_per_token2=2e-8)
    tilt = {32: 0.8, 64: 0.9, 128: 1.0, 512: 1.05, 1024: 1.0, 2048: 1.0}
    pts = [(n, truth.predict_s(n) * f) for n, f in tilt.items()]
    plain = fit(pts, nonnegative=False)
    assert plain.c0_s < 0  # what the constraint is for
    m = fit(pts)
    assert min(m.c0_s, m.c1_s_per_token, m.c2_s_per_token2) >= 0 and m.c0_s == 0.0

    def rel_sq(model: RecomputeCostModel) -> float:
        return sum((model.predict_s(n) / t - 1) ** 2 for n, t in pts)

    # no non-negative model does better: nudge each coefficient up and see the error grow
    for field in ("c0_s", "c1_s_per_token", "c2_s_per_token2"):
        bumped = dataclasses.replace(m, **{field: getattr(m, field) * 1.01 + 1e-9})
        assert rel_sq(bumped) >= rel_sq(m)
    # a fit whose plain optimum is already non-negative is unchanged
    clean = [(n, TRUE.predict_s(n)) for n in (16, 64, 256, 1024)]
    assert fit(clean) == fit(clean, nonnegative=False)


def test_the_export_is_read_by_the_scheduler() -> None:
    """fastckpt.sched reads the plain dict as exported (both sides agree on the formula)."""
    from fastckpt.sched import RecomputeModel

    m = fit([(n, TRUE.predict_s(n)) for n in (16, 64, 256, 1024)], engine="vllm-cpu")
    plain = json.loads(json.dumps(m.to_dict()))
    sched = RecomputeModel.from_dict(plain)
    for n in (1, 100, 3000):
        assert sched.cost_s(n) == pytest.approx(m.predict_s(n))
