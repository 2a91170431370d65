"""Bootstrap intervals and ranks: coverage on simulated leagues with known strengths, determinism by seed, the
quantile and rank rules."""

import random

import numpy as np
import pytest

from styled_battles import random_styled_battles

from jvila.eval.battles import Battle
from jvila.eval.bootstrap import (bootstrap_bt, bootstrap_elo, bootstrap_style_controlled_bt, intervals,
                                  ranks_from_intervals)


def _league(rng, strengths, n):
    """Battles drawn from BT with natural-scale (log10 odds) strengths; no ties, so BT is the true model."""
    models = list(strengths)
    battles = []
    for t in range(n):
        a, b = rng.sample(models, 2)
        p = 1.0 / (1.0 + 10 ** (strengths[b] - strengths[a]))
        battles.append(Battle(a, b, "model_a" if rng.random() < p else "model_b", float(t)))
    return battles


def test_bt_intervals_cover_true_ratings_at_about_their_level():
    rng = random.Random(1234)
    covered = {0.95: [], 0.5: []}
    for _ in range(12):
        strengths = {f"m{i}": rng.gauss(0, 0.3) for i in range(6)}
        mean = np.mean(list(strengths.values()))
        # Our ratings have mean 1000 (the fit keeps the strengths' mean at zero); so must the truth.
        truth = {m: 1000 + 400 * (s - mean) for m, s in strengths.items()}
        models, samples = bootstrap_bt(_league(rng, strengths, 600), rounds=100, seed=rng.randrange(2**31))
        for level in covered:
            lower, upper = intervals(samples, level)
            covered[level] += [lo <= truth[m] <= up for m, lo, up in zip(models, lower, upper)]
    rate_95, rate_50 = np.mean(covered[0.95]), np.mean(covered[0.5])
    # 72 intervals each: binomial s.d. ~0.026 at 95%, ~0.06 at 50%; bounds at ~3 s.d.
    assert 0.86 <= rate_95 <= 1.0, rate_95
    assert 0.32 <= rate_50 <= 0.68, rate_50


def test_same_seed_same_intervals_other_seed_other_draws():
    rng = random.Random(7)
    battles = _league(rng, {"a": 0.3, "b": 0.0, "c": -0.2, "d": 0.1}, 300)
    for bootstrap in (bootstrap_bt, bootstrap_elo):
        models, first = bootstrap(battles, 20, seed=5)
        again_models, again = bootstrap(battles, 20, seed=5)
        _, other = bootstrap(battles, 20, seed=6)
        assert models == again_models and first.shape == (20, 4)
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)
        assert np.all(first.std(axis=0) > 0)  # the resamples differ from each other


def test_elo_bootstrap_centres_on_the_stronger_models():
    rng = random.Random(17)
    battles = _league(rng, {"strong": 0.5, "middle": 0.0, "weak": -0.5}, 900)
    models, samples = bootstrap_elo(battles, 50, seed=0)
    median = dict(zip(models, np.median(samples, axis=0)))
    assert median["strong"] > median["middle"] > median["weak"]
    # Elo is zero-sum: every resample's ratings average 1000.
    np.testing.assert_allclose(samples.mean(axis=1), 1000.0, atol=1e-9)


def test_style_controlled_bootstrap_runs_on_resampled_battles():
    battles = random_styled_battles(3, 120, max_markdown=50)
    models, samples = bootstrap_style_controlled_bt(battles, 8, seed=1)
    assert sorted(models) == ["x", "y", "z"] and samples.shape == (8, 3)
    assert np.all(np.isfinite(samples)) and np.all(samples.std(axis=0) > 0)


def test_intervals_are_linear_interpolated_quantiles():
    samples = np.random.default_rng(0).normal(1000, 30, size=(41, 3))
    lower, upper = intervals(samples)
    for j in range(3):
        ordered = np.sort(samples[:, j])
        # 41 samples: the 2.5% quantile sits at position 0.025 * 40 = 1.0, the 97.5% at 39.0.
        assert lower[j] == pytest.approx(ordered[1]) and upper[j] == pytest.approx(ordered[39])
    with pytest.raises(ValueError, match="at least one round"):
        intervals(np.zeros((0, 3)))


def test_ranks_count_models_whose_interval_is_wholly_above():
    lower = np.array([10.0, 15.0, 30.0, 29.0, -5.0])
    upper = np.array([20.0, 25.0, 40.0, 35.0, 14.0])
    # model 2 and 3 overlap: both rank 1. Model 1 has 2 and 3 above it. Model 0 too (15 < 20 overlaps model 1).
    # Model 4 (up to 14): models 1, 2, 3 are wholly above; model 0 (from 10) overlaps.
    np.testing.assert_array_equal(ranks_from_intervals(lower, upper), [3, 3, 1, 1, 4])


def test_ranks_match_the_sorted_search_formulation():
    rng = np.random.default_rng(2)
    centre = rng.normal(1000, 60, size=17)
    lower, upper = centre - rng.uniform(5, 40, 17), centre + rng.uniform(5, 40, 17)
    # The Arena's monitor computes the same ranks with a binary search over sorted lower bounds.
    expected = 1 + len(lower) - np.searchsorted(np.sort(lower), upper, side="right")
    np.testing.assert_array_equal(ranks_from_intervals(lower, upper), expected)
