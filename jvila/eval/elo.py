"""Online Elo over battles in time order, as Chatbot Arena's first leaderboard computed it.

After each battle both ratings move by K * (S - E): S is model_a's score (1 win, 0.5 tie, 0 loss) and
E = 1 / (1 + base ** ((R_b - R_a) / scale)) its expected score. K=4 (small, so late battles do not dominate),
base 10, scale 400, every model starting at 1000.
"""

from __future__ import annotations

import math

import numpy as np

from jvila.eval.battles import Battle, encode, sorted_by_time

K = 4.0
BASE = 10.0
SCALE = 400.0
INIT_RATING = 1000.0


def elo_ratings(battles: list[Battle], *, k: float = K, base: float = BASE, scale: float = SCALE,
                init_rating: float = INIT_RATING) -> dict[str, float]:
    """Each model's rating after replaying `battles` in tstamp order."""
    if not battles:
        raise ValueError("no battles to rate")
    models, matchups, outcomes = encode(sorted_by_time(battles))
    ratings = fit_elo(matchups, outcomes, len(models), k=k, base=base, scale=scale, init_rating=init_rating)
    return dict(zip(models, ratings.tolist()))


def fit_elo(matchups: np.ndarray, outcomes: np.ndarray, num_models: int, *, k: float = K, base: float = BASE,
            scale: float = SCALE, init_rating: float = INIT_RATING) -> np.ndarray:
    """Ratings after the battles in the given (row) order: matchups (N, 2) model indices, outcomes (N,)."""
    return fit_elo_samples(matchups, outcomes, np.arange(len(outcomes))[:, None], num_models, k=k, base=base,
                           scale=scale, init_rating=init_rating)[0]


def fit_elo_samples(matchups: np.ndarray, outcomes: np.ndarray, sample_indices: np.ndarray, num_models: int, *,
                    k: float = K, base: float = BASE, scale: float = SCALE,
                    init_rating: float = INIT_RATING) -> np.ndarray:
    """Elo on several resamples at once: column s of `sample_indices` (steps × samples) lists the battles that
    sample replays, in that order. Returns (samples, num_models). Vectorised over samples, sequential in time."""
    alpha = math.log(base) / scale
    num_samples = sample_indices.shape[1]
    ratings = np.zeros((num_samples, num_models), dtype=np.float64)
    samples = np.arange(num_samples)
    for step in sample_indices:
        a, b = matchups[step, 0], matchups[step, 1]
        # 1 / (1 + base**((R_b - R_a)/scale)) is the logistic of alpha * (R_a - R_b).
        expected = 1.0 / (1.0 + np.exp(-alpha * (ratings[samples, a] - ratings[samples, b])))
        update = k * (outcomes[step] - expected)
        ratings[samples, a] += update
        ratings[samples, b] -= update
    return ratings + init_rating
