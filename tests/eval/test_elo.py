"""Online Elo: hand-computed updates, time order, and agreement with a plain-Python formulation."""

import math
import random

import numpy as np
import pytest

from jvila.eval.battles import WINNERS, Battle, encode
from jvila.eval.elo import elo_ratings, fit_elo_samples


def _reference_elo(battles, k=4.0, base=10.0, scale=400.0, init=1000.0):
    """The textbook update, one battle at a time in tstamp order, on a dict."""
    ratings = {}
    for b in sorted(battles, key=lambda b: b.tstamp):
        ra, rb = ratings.setdefault(b.model_a, init), ratings.setdefault(b.model_b, init)
        expected_a = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        score_a = {"model_a": 1.0, "model_b": 0.0}.get(b.winner, 0.5)
        ratings[b.model_a] = ra + k * (score_a - expected_a)
        ratings[b.model_b] = rb - k * (score_a - expected_a)
    return ratings


def _random_battles(rng, n, models=("m0", "m1", "m2", "m3", "m4")):
    return [Battle(*rng.sample(models, 2), rng.choice(WINNERS), rng.uniform(0, 1e6)) for _ in range(n)]


def test_hand_computed_updates():
    # First battle: equal ratings, expected score 0.5, so the winner gains K/2 = 2 points.
    first = elo_ratings([Battle("a", "b", "model_a", 1.0)])
    assert first == {"a": 1002.0, "b": 998.0}
    # Second battle, a beats b again: E_a = 1 / (1 + 10^(-4/400)) = 0.5057562..., gain 4 * (1 - E_a) = 1.9769752...
    second = elo_ratings([Battle("a", "b", "model_a", 1.0), Battle("b", "a", "model_b", 2.0)])
    assert second["a"] == pytest.approx(1002.0 + 1.9769752, abs=1e-6)
    assert second["b"] == pytest.approx(998.0 - 1.9769752, abs=1e-6)
    # A tie between equals moves nothing; a tie after a's win moves a back by 4 * (0.5 - E_a).
    assert elo_ratings([Battle("a", "b", "tie", 1.0)]) == {"a": 1000.0, "b": 1000.0}
    third = elo_ratings([Battle("a", "b", "model_a", 1.0), Battle("a", "b", "tie (bothbad)", 2.0)])
    assert third["a"] == pytest.approx(1002.0 - 4 * (0.5057562 - 0.5), abs=1e-6)


def test_battles_are_replayed_in_time_order():
    rng = random.Random(11)
    battles = _random_battles(rng, 40)
    shuffled = rng.sample(battles, len(battles))
    assert elo_ratings(shuffled) == pytest.approx(elo_ratings(battles), abs=1e-9)
    # Order matters to online Elo: replaying in file order instead would change the ratings.
    in_file_order = [Battle(b.model_a, b.model_b, b.winner, float(i)) for i, b in enumerate(shuffled)]
    assert elo_ratings(in_file_order) != pytest.approx(elo_ratings(battles), abs=1e-3)


def test_agrees_with_plain_python_reference():
    rng = random.Random(5)
    battles = _random_battles(rng, 300)
    ours, reference = elo_ratings(battles), _reference_elo(battles)
    assert ours.keys() == reference.keys()
    for model in reference:  # same arithmetic in another order of operations: agreement to rounding
        assert ours[model] == pytest.approx(reference[model], abs=1e-6)
    # Zero-sum: K moves as much rating from the loser as to the winner.
    assert sum(ours.values()) == pytest.approx(1000.0 * len(ours), abs=1e-6)
    custom = elo_ratings(battles, k=32, base=math.e, scale=100, init_rating=1500)
    reference = _reference_elo(battles, k=32, base=math.e, scale=100, init=1500)
    for model in reference:
        assert custom[model] == pytest.approx(reference[model], abs=1e-6)


def test_vectorised_resamples_match_one_replay_each():
    rng = random.Random(8)
    battles = _random_battles(rng, 60)
    models, matchups, outcomes = encode(battles)
    sample_indices = np.random.default_rng(3).integers(0, len(battles), size=(len(battles), 7))
    together = fit_elo_samples(matchups, outcomes, sample_indices, len(models))
    for s in range(sample_indices.shape[1]):
        # A resample is the battle list in draw order; the reference sorts by tstamp, so number them in that order.
        replay = [Battle(battles[i].model_a, battles[i].model_b, battles[i].winner, float(t))
                  for t, i in enumerate(sample_indices[:, s])]
        reference = _reference_elo(replay)
        expected = [reference.get(m, 1000.0) for m in models]  # a model never drawn keeps its initial rating
        np.testing.assert_allclose(together[s], expected, rtol=0, atol=1e-6)


def test_no_battles_is_an_error():
    with pytest.raises(ValueError, match="no battles"):
        elo_ratings([])
