"""Bootstrap confidence intervals for Arena ratings, and ranks from them, as Chatbot Arena computes them.

Each round refits the ratings on a resample of the battles, drawn with replacement; the 95% interval of a model is
the 2.5% and 97.5% quantiles of its rating over the rounds (linear interpolation, as pandas' quantile). A model's
rank is 1 + the number of models whose lower bound is above its upper bound: models whose intervals overlap share
a rank. All draws come from one seeded numpy Generator, so a seed reproduces the intervals.
"""

from __future__ import annotations

import numpy as np

from jvila.eval.battles import Battle, encode
from jvila.eval.bradley_terry import (fit_bt, fit_style_controlled_bt, single_threaded_blas, style_features,
                                      to_elo_scale, weighted_outcomes)
from jvila.eval.elo import fit_elo_samples

LEVEL = 0.95


def bootstrap_elo(battles: list[Battle], rounds: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(models, ratings (rounds, models)): online Elo replayed over `rounds` resamples of the battles. As in
    FastChat, a resample replays its draws in draw order, not in time order."""
    models, matchups, outcomes = encode(battles)
    rng = np.random.default_rng(seed)
    sample_indices = rng.integers(0, len(battles), size=(len(battles), rounds))
    return models, fit_elo_samples(matchups, outcomes, sample_indices, len(models))


def bootstrap_bt(battles: list[Battle], rounds: int, seed: int = 0,
                 anchor: tuple[str, float] | None = None) -> tuple[list[str], np.ndarray]:
    """(models, ratings (rounds, models)): Bradley-Terry refit on `rounds` resamples. Resampling N battles with
    replacement is a multinomial draw of how often each distinct (pair, outcome) occurs, which is what is drawn."""
    models, matchups, outcomes = encode(battles)
    pairs, pair_outcomes, counts = weighted_outcomes(matchups, outcomes)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(battles), counts / counts.sum(), size=rounds)
    # Weights as frequencies (FastChat's choice): the maximiser is the same as with raw counts.
    with single_threaded_blas():
        strengths = np.stack([fit_bt(pairs, pair_outcomes, draw / len(battles), len(models)) for draw in draws])
    return models, to_elo_scale(strengths, models, anchor=anchor)


def bootstrap_style_controlled_bt(battles: list[Battle], rounds: int, seed: int = 0,
                                  anchor: tuple[str, float] | None = None) -> tuple[list[str], np.ndarray]:
    """(models, ratings (rounds, models)) of style-controlled Bradley-Terry refit on `rounds` resamples of the
    battles; the style features are standardised once on all battles, as FastChat does."""
    models, matchups, outcomes = encode(battles)
    features = style_features(battles)
    rng = np.random.default_rng(seed)
    strengths = []
    with single_threaded_blas():
        for sample in rng.integers(0, len(battles), size=(rounds, len(battles))):
            fitted, _ = fit_style_controlled_bt(matchups[sample], features[sample], outcomes[sample], len(models))
            strengths.append(fitted)
    return models, to_elo_scale(np.stack(strengths), models, anchor=anchor)


def intervals(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per column of `samples` (rounds, models): the central `level` quantile interval."""
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be (rounds, models) with at least one round, got shape {samples.shape}")
    tail = (1.0 - level) / 2.0
    return np.quantile(samples, tail, axis=0), np.quantile(samples, 1.0 - tail, axis=0)


def ranks_from_intervals(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """1 + how many models are surely better: their lower bound is strictly above this model's upper bound."""
    lower, upper = np.asarray(lower), np.asarray(upper)
    return 1 + (lower[None, :] > upper[:, None]).sum(axis=1)
