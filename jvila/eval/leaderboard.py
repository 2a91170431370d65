"""The Arena leaderboard: ratings, 95% intervals, ranks and battle counts from a list of battles, plus the
observed and predicted pairwise win-rate matrices. This is the entry point the Arena pages and `jvila eval arena`
share.

Ratings follow Chatbot Arena: Bradley-Terry (method "bt", optionally style-controlled) is the fit on all battles,
with bootstrap intervals around it; online Elo (method "elo") reports, like FastChat, the median over the
bootstrap rounds rounded to an integer (the online ratings replayed in time order when there is no bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jvila.eval.battles import Battle, sorted_by_time
from jvila.eval.bootstrap import (bootstrap_bt, bootstrap_elo, bootstrap_style_controlled_bt, intervals,
                                  ranks_from_intervals)
from jvila.eval.bradley_terry import ARENA_ANCHOR, BASE, SCALE, bt_ratings, style_controlled_ratings
from jvila.eval.elo import elo_ratings

METHODS = ("bt", "elo")


@dataclass(frozen=True)
class LeaderboardRow:
    model: str
    rating: float
    lower: float  # 2.5% bootstrap quantile (= rating without bootstrap)
    upper: float  # 97.5% bootstrap quantile
    rank: int  # 1 + models whose interval lies wholly above this one's
    num_battles: int


def leaderboard(battles: list[Battle], *, method: str = "bt", bootstrap_rounds: int = 100, seed: int = 0,
                style_control: bool = False,
                anchor: tuple[str, float] | None = ARENA_ANCHOR) -> list[LeaderboardRow]:
    """One row per model, best rating first (ties by name). Bradley-Terry ratings average 1000 unless the
    `anchor=(model, rating)` model is among them: then that model has that rating (by default the Arena's
    mixtral-8x7b-instruct-v0.1 at 1114, as FastChat does; None turns anchoring off)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(bootstrap_rounds, bool) or not isinstance(bootstrap_rounds, int) or bootstrap_rounds < 0:
        raise ValueError(f"bootstrap_rounds must be a non-negative integer, got {bootstrap_rounds!r}")
    if style_control and method != "bt":
        raise ValueError("style control applies to Bradley-Terry ratings (method 'bt') only")
    if not battles:
        raise ValueError("no battles to rate")
    battles = sorted_by_time(battles)

    samples = None
    if method == "elo":
        if bootstrap_rounds:
            models, samples = bootstrap_elo(battles, bootstrap_rounds, seed)
            # FastChat: int(median + 0.5).
            ratings = dict(zip(models, np.floor(np.quantile(samples, 0.5, axis=0) + 0.5).tolist()))
        else:
            ratings = elo_ratings(battles)
            models = list(ratings)
    elif style_control:
        ratings, _ = style_controlled_ratings(battles, anchor=anchor)
        models = list(ratings)
        if bootstrap_rounds:
            models, samples = bootstrap_style_controlled_bt(battles, bootstrap_rounds, seed, anchor=anchor)
    else:
        ratings = bt_ratings(battles, anchor=anchor)
        models = list(ratings)
        if bootstrap_rounds:
            models, samples = bootstrap_bt(battles, bootstrap_rounds, seed, anchor=anchor)

    rating = np.array([ratings[m] for m in models])
    lower, upper = intervals(samples) if samples is not None else (rating, rating)
    ranks = ranks_from_intervals(lower, upper)
    counts = battle_counts(battles)
    rows = [LeaderboardRow(model, float(rating[i]), float(lower[i]), float(upper[i]), int(ranks[i]), counts[model])
            for i, model in enumerate(models)]
    return sorted(rows, key=lambda row: (-row.rating, row.model))


def battle_counts(battles: list[Battle]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for battle in battles:
        for model in (battle.model_a, battle.model_b):
            counts[model] = counts.get(model, 0) + 1
    return counts


def win_rate_matrix(battles: list[Battle], models: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(models, W): W[i, j] is the share of decided (non-tie) battles between models i and j that i won, in either
    seat; NaN where they never had a decided battle. Without `models`, rows are ordered by average win rate."""
    decided = [b for b in battles if not b.is_tie]
    names = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: i for i, m in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for b in decided:
        winner, loser = (b.model_a, b.model_b) if b.winner == "model_a" else (b.model_b, b.model_a)
        wins[index[winner], index[loser]] += 1
    played = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(played > 0, wins / np.where(played > 0, played, 1), np.nan)
    if models is None:
        average = np.array([np.nanmean(row) if np.any(~np.isnan(row)) else -1.0 for row in rates])
        models = [names[i] for i in sorted(range(len(names)), key=lambda i: (-average[i], names[i]))]
    unknown = [m for m in models if m not in index]
    if unknown:
        raise ValueError(f"models not in the battles: {', '.join(unknown)}")
    order = [index[m] for m in models]
    return list(models), rates[np.ix_(order, order)]


def predicted_win_rate_matrix(ratings: dict[str, float] | list[LeaderboardRow], *, base: float = BASE,
                              scale: float = SCALE) -> tuple[list[str], np.ndarray]:
    """(models, P): P[i, j] = 1 / (1 + base ** ((R_j - R_i) / scale)), the win rate the ratings predict; NaN on
    the diagonal."""
    if isinstance(ratings, list):
        ratings = {row.model: row.rating for row in ratings}
    models = list(ratings)
    r = np.array([ratings[m] for m in models])
    predicted = 1.0 / (1.0 + base ** ((r[None, :] - r[:, None]) / scale))
    np.fill_diagonal(predicted, np.nan)
    return models, predicted


def format_leaderboard(rows: list[LeaderboardRow]) -> str:
    """A plain-text table: rank, model, rating, the 95% interval as signed offsets from the rating (a point
    estimate can fall outside its bootstrap interval when a model never lost), battles."""
    width = max([len("model")] + [len(row.model) for row in rows])
    lines = [f"{'rank':>4}  {'model':<{width}}  {'rating':>8}  {'95% CI':>13}  {'battles':>7}"]
    for row in rows:
        interval = f"{row.lower - row.rating:+.1f}/{row.upper - row.rating:+.1f}"
        lines.append(f"{row.rank:>4}  {row.model:<{width}}  {row.rating:>8.1f}  {interval:>13}  {row.num_battles:>7}")
    return "\n".join(lines)


def is_finite_row(row: LeaderboardRow) -> bool:
    """Whether a row's rating and bounds are all finite numbers (what a chart can draw)."""
    return all(math.isfinite(v) for v in (row.rating, row.lower, row.upper))
