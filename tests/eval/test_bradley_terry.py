"""Bradley-Terry ratings: closed forms, logistic regression on duplicated battles, the weighted likelihood,
anchoring and style control."""

import math
import random

import numpy as np
import pytest

from jvila.eval.battles import WINNERS, Battle, encode
from jvila.eval.bradley_terry import (bt_ratings, fit_bt, style_controlled_ratings, style_features,
                                      weighted_outcomes)

LN10 = math.log(10.0)


def _random_battles(rng, n, strengths, tie_rate=0.15):
    """Battles whose outcomes follow BT with the given natural-scale strengths, with some ties at random."""
    models = list(strengths)
    battles = []
    for _ in range(n):
        a, b = rng.sample(models, 2)
        p = 1.0 / (1.0 + 10 ** (strengths[b] - strengths[a]))
        if rng.random() < tie_rate:
            winner = rng.choice(["tie", "tie (bothbad)"])
        else:
            winner = "model_a" if rng.random() < p else "model_b"
        battles.append(Battle(a, b, winner, rng.uniform(0, 1e6)))
    return battles


def _newton_logistic(X, y, sample_weight, l2=0.0, iterations=50):
    """Weighted logistic regression without intercept by Newton's method (exact to rounding in a few steps)."""
    w = np.zeros(X.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        grad = X.T @ (sample_weight * (p - y)) + l2 * w
        hessian = (X * (sample_weight * p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        w -= np.linalg.solve(hessian, grad)
    return w


def _duplicated_logistic_bt(battles):
    """The Arena's original formulation: each battle becomes two logistic-regression rows (a win counts twice,
    a tie once each way), features +ln10 for model_a and -ln10 for model_b, no intercept. The last model is
    pinned at 0 (the likelihood only sees differences); ratings are then centred on 1000 like ours."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: i for i, m in enumerate(models)}
    rows, labels = [], []
    for b in battles:
        x = np.zeros(len(models))
        x[index[b.model_a]], x[index[b.model_b]] = LN10, -LN10
        pair = {"model_a": (1.0, 1.0), "model_b": (0.0, 0.0)}.get(b.winner, (1.0, 0.0))
        for label in pair:
            rows.append(x)
            labels.append(label)
    X, y = np.array(rows)[:, :-1], np.array(labels)
    w = np.append(_newton_logistic(X, y, np.ones(len(y))), 0.0)
    ratings = 400 * (w - w.mean()) + 1000
    return dict(zip(models, ratings))


def test_two_models_closed_form():
    # With two models the MLE solves p = (wins + ties/2) / n, so the gap is 400 * log10(p / (1 - p)).
    battles = ([Battle("a", "b", "model_a", t) for t in range(7)] + [Battle("b", "a", "model_a", 10.0 + t)
                                                                      for t in range(3)]
               + [Battle("a", "b", "tie", 20.0), Battle("b", "a", "tie (bothbad)", 21.0)])
    p = (7 + 1) / 12
    gap = 400 * math.log10(p / (1 - p))
    ratings = bt_ratings(battles)
    assert ratings["a"] == pytest.approx(1000 + gap / 2, abs=1e-6)
    assert ratings["b"] == pytest.approx(1000 - gap / 2, abs=1e-6)


def test_agrees_with_logistic_regression_on_duplicated_battles():
    rng = random.Random(2)
    strengths = {f"model-{i}": rng.gauss(0, 0.4) for i in range(6)}
    battles = _random_battles(rng, 700, strengths)
    ours, reference = bt_ratings(battles), _duplicated_logistic_bt(battles)
    assert ours.keys() == reference.keys()
    for model in reference:  # both are the same maximiser; L-BFGS stops at gradient 1e-6, Newton at rounding
        assert ours[model] == pytest.approx(reference[model], abs=1e-6)


def test_fit_zeroes_the_gradient_of_the_weighted_likelihood():
    rng = random.Random(9)
    battles = _random_battles(rng, 500, {f"m{i}": rng.gauss(0, 0.3) for i in range(5)})
    models, matchups, outcomes = encode(battles)
    pairs, pair_outcomes, weights = weighted_outcomes(matchups, outcomes)
    assert weights.sum() == len(battles) and len(pairs) < len(battles)  # repeated (pair, outcome) collapse
    strengths = fit_bt(pairs, pair_outcomes, weights, len(models))

    def log_likelihood(s):  # per battle, from the raw battle list, not the collapsed weights
        p = 1 / (1 + 10 ** (s[matchups[:, 1]] - s[matchups[:, 0]]))
        return np.sum(outcomes * np.log(p) + (1 - outcomes) * np.log(1 - p))

    base = log_likelihood(strengths)
    for i in range(len(models)):  # central differences: the maximum is flat in every direction
        step = np.zeros(len(models))
        step[i] = 1e-5
        assert (log_likelihood(strengths + step) - log_likelihood(strengths - step)) / 2e-5 == pytest.approx(
            0, abs=1e-4)
        assert log_likelihood(strengths + 100 * step) < base
    assert abs(strengths.mean()) < 1e-9  # L-BFGS from zero never leaves the mean-zero subspace


def test_recovers_known_strengths_on_a_large_league():
    rng = random.Random(21)
    strengths = {f"m{i}": s for i, s in enumerate([-0.5, -0.2, 0.0, 0.3, 0.6])}
    ratings = bt_ratings(_random_battles(rng, 20000, strengths, tie_rate=0.0))  # random ties would shrink gaps
    mean = np.mean(list(strengths.values()))
    for model, s in strengths.items():  # sampling error at 20k battles is ~5 rating points
        assert ratings[model] == pytest.approx(1000 + 400 * (s - mean), abs=20)


def test_anchor_shifts_every_rating():
    rng = random.Random(3)
    battles = _random_battles(rng, 200, {"x": 0.2, "y": 0.0, "z": -0.1})
    plain, anchored = bt_ratings(battles), bt_ratings(battles, anchor=("y", 1114.0))
    assert anchored["y"] == pytest.approx(1114.0, abs=1e-9)
    for model in plain:
        assert anchored[model] - plain[model] == pytest.approx(1114.0 - plain["y"], abs=1e-9)
    assert bt_ratings(battles, anchor=("absent", 1114.0)) == plain


def _style_battles(rng, n, verbose_bonus):
    """Equal models; the longer answer wins more often when verbose_bonus > 0. 'wordy' writes longer answers."""
    battles = []
    for _ in range(n):
        a, b = rng.sample(["wordy", "terse", "plain"], 2)
        length = {"wordy": rng.randint(400, 900), "terse": rng.randint(20, 200), "plain": rng.randint(100, 600)}
        meta = {"sum_assistant_a_tokens": length[a], "sum_assistant_b_tokens": length[b],
                "header_count_a": {"h1": rng.randint(0, 3), "h2": rng.randint(0, 2)},
                "header_count_b": {"h1": rng.randint(0, 3), "h2": rng.randint(0, 2)},
                "list_count_a": {"ordered": rng.randint(0, 5), "unordered": rng.randint(0, 5)},
                "list_count_b": {"ordered": rng.randint(0, 5), "unordered": rng.randint(0, 5)},
                "bold_count_a": rng.randint(0, 6), "bold_count_b": rng.randint(0, 6)}
        diff = (length[a] - length[b]) / (length[a] + length[b] + 1)
        p = 1 / (1 + math.exp(-verbose_bonus * diff))
        winner = "model_a" if rng.random() < p else "model_b"
        battles.append(Battle(a, b, winner, rng.uniform(0, 1e6), meta))
    return battles


def test_style_features_follow_the_arena_formula():
    rng = random.Random(6)
    battles = _style_battles(rng, 50, 0.0)
    features = style_features(battles)
    m = battles[7].conv_metadata
    raw = np.array([[(b.conv_metadata["sum_assistant_a_tokens"] - b.conv_metadata["sum_assistant_b_tokens"])
                     / (b.conv_metadata["sum_assistant_a_tokens"] + b.conv_metadata["sum_assistant_b_tokens"] + 1)]
                    for b in battles])[:, 0]
    assert features[7, 0] == pytest.approx((raw[7] - raw.mean()) / raw.std(), abs=1e-12)
    bold = (m["bold_count_a"] - m["bold_count_b"]) / (m["bold_count_a"] + m["bold_count_b"] + 1)
    bold_all = np.array([(b.conv_metadata["bold_count_a"] - b.conv_metadata["bold_count_b"])
                         / (b.conv_metadata["bold_count_a"] + b.conv_metadata["bold_count_b"] + 1) for b in battles])
    assert features[7, 3] == pytest.approx((bold - bold_all.mean()) / bold_all.std(), abs=1e-12)
    headers_a = sum(m["header_count_a"].values())  # dicts of counts are summed
    headers_b = sum(m["header_count_b"].values())
    header_all = np.array([(sum(b.conv_metadata["header_count_a"].values()) - sum(b.conv_metadata["header_count_b"]
                                                                                   .values()))
                           / (sum(b.conv_metadata["header_count_a"].values())
                              + sum(b.conv_metadata["header_count_b"].values()) + 1) for b in battles])
    assert features[7, 1] == pytest.approx(
        ((headers_a - headers_b) / (headers_a + headers_b + 1) - header_all.mean()) / header_all.std(), abs=1e-12)


def test_style_control_agrees_with_penalised_logistic_regression():
    rng = random.Random(12)
    battles = _style_battles(rng, 400, 3.0)
    ratings, coefficients = style_controlled_ratings(battles)
    models, matchups, outcomes = encode(battles)
    # Same objective written as weighted logistic regression: a tie is two half-weight rows (label 1 and 0),
    # penalty (0.5 / 2) * |params|^2 → l2 = 0.5 in Newton's gradient.
    X = np.zeros((len(battles), len(models)))
    X[np.arange(len(battles)), matchups[:, 0]] = LN10
    X[np.arange(len(battles)), matchups[:, 1]] = -LN10
    X = np.hstack([X, style_features(battles)])
    X2 = np.vstack([X, X])
    y2 = np.concatenate([np.ones(len(battles)), np.zeros(len(battles))])
    w2 = np.concatenate([outcomes, 1 - outcomes])
    params = _newton_logistic(X2, y2, w2, l2=0.5)
    expected = 400 * params[:len(models)] + 1000
    for i, model in enumerate(models):
        assert ratings[model] == pytest.approx(expected[i], abs=1e-6)
    np.testing.assert_allclose(coefficients, params[len(models):], atol=1e-6)


def test_style_control_removes_a_length_advantage():
    rng = random.Random(13)
    battles = _style_battles(rng, 3000, 4.0)  # equal models; only length decides
    plain = bt_ratings(battles)
    controlled, coefficients = style_controlled_ratings(battles)
    assert plain["wordy"] - plain["terse"] > 100  # plain BT credits the verbose model
    assert abs(controlled["wordy"] - controlled["terse"]) < 30  # style control does not
    assert coefficients[0] > 0.5  # and the length coefficient carries the effect


def test_style_control_needs_metadata():
    with pytest.raises(ValueError, match="no conv_metadata"):
        style_controlled_ratings([Battle("a", "b", "model_a", 0.0)])
    meta = {"sum_assistant_a_tokens": 1, "sum_assistant_b_tokens": 2, "header_count_a": 0, "header_count_b": 0,
            "list_count_a": 0, "list_count_b": 0, "bold_count_a": 0}
    with pytest.raises(ValueError, match="'bold_count_b'"):
        style_controlled_ratings([Battle("a", "b", "model_a", 0.0, meta)])
    meta["bold_count_b"] = "many"
    with pytest.raises(ValueError, match="must be a count"):
        style_controlled_ratings([Battle("a", "b", "model_a", 0.0, meta)])
    meta["bold_count_b"] = 0
    with pytest.raises(ValueError, match="does not vary"):
        style_controlled_ratings([Battle("a", "b", "model_a", 0.0, meta), Battle("b", "a", "tie", 1.0, meta)])


def test_every_winner_value_is_scored():
    battles = [Battle("a", "b", w, float(i)) for i, w in enumerate(WINNERS * 3)]
    ratings = bt_ratings(battles)  # a and b each win 3, 6 ties: equal
    assert ratings["a"] == pytest.approx(1000, abs=1e-6) and ratings["b"] == pytest.approx(1000, abs=1e-6)
