"""The Arena's leaderboard from the stored votes, through jvila.eval.leaderboard, kept until the next vote.

Three views, as Chatbot Arena's leaderboard offers: Bradley-Terry ("bt"), Bradley-Terry with style
control (answer length and markdown counted in each battle's conv_metadata), and online Elo ("elo").
Bootstrapping a few hundred refits takes a while, so each view is computed once per set of votes.
"""

from __future__ import annotations

import math
import tempfile
import threading
from pathlib import Path

from serving.arena.export import battle_record
from serving.arena.store import ArenaStore

VIEWS = {("bt", False): "Bradley-Terry", ("bt", True): "Bradley-Terry, style control", ("elo", False): "online Elo"}


def check_view(method: str, style_control: bool) -> tuple[str, bool]:
    if (method, style_control) not in VIEWS:
        if method not in ("bt", "elo"):
            raise ValueError(f"method must be 'bt' or 'elo', got {method!r}")
        raise ValueError("style control applies to Bradley-Terry ratings (method 'bt') only")
    return method, style_control


class Ratings:
    """Leaderboards of the votes in `store`, cached per view until the votes change (safe from any thread)."""

    def __init__(self, store: ArenaStore, *, bootstrap_rounds: int, seed: int = 0):
        self.store, self.bootstrap_rounds, self.seed = store, bootstrap_rounds, seed
        self._lock = threading.Lock()
        self._votes_key = None
        self._views: dict[tuple[str, bool], dict] = {}

    def board(self, method: str = "bt", style_control: bool = False) -> dict:
        """{"method", "style_control", "view", "bootstrap_rounds", "votes", "rows": [{rank, model, rating, lower,
        upper, num_battles}], "unavailable"}: rows best first, non-finite ratings (a model that never lost) as None;
        "unavailable" says why there are no rows when the votes cannot be rated this way yet (else None)."""
        return self._view(method, style_control)["board"]

    def chart(self, method: str = "bt", style_control: bool = False) -> bytes | None:
        """The ratings chart as PNG bytes (None without votes)."""
        from jvila.eval.leaderboard import is_finite_row
        from jvila.eval.plots import plot_leaderboard

        view = self._view(method, style_control)
        with self._lock:
            if view.get("png") is None:
                rows = [row for row in view["rows"] if is_finite_row(row)]
                if not rows:
                    return None
                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / "leaderboard.png"
                    plot_leaderboard(rows, path, title=f"Arena ratings: {VIEWS[method, style_control]} "
                                                       "(95% intervals)")
                    view["png"] = path.read_bytes()
            return view["png"]

    def _view(self, method: str, style_control: bool) -> dict:
        from jvila.eval.battles import parse_battle
        from jvila.eval.leaderboard import leaderboard

        method, style_control = check_view(method, style_control)
        battles = self.store.voted_battles()
        votes_key = (len(battles), battles[-1].id if battles else None)
        with self._lock:
            if votes_key != self._votes_key:
                self._votes_key, self._views = votes_key, {}
            if (method, style_control) not in self._views:
                rows, unavailable = [], None
                if battles:
                    records = [parse_battle(battle_record(b)) for b in battles]
                    try:
                        rows = leaderboard(records, method=method, bootstrap_rounds=self.bootstrap_rounds,
                                           seed=self.seed, style_control=style_control)
                    except ValueError as e:  # e.g. style control while no answer has had a header yet
                        unavailable = str(e)
                board = {"method": method, "style_control": style_control, "view": VIEWS[method, style_control],
                         "bootstrap_rounds": self.bootstrap_rounds, "votes": len(battles), "unavailable": unavailable,
                         "rows": [{"rank": r.rank, "model": r.model, "rating": _finite(r.rating),
                                   "lower": _finite(r.lower), "upper": _finite(r.upper), "num_battles": r.num_battles}
                                  for r in rows]}
                self._views[method, style_control] = {"board": board, "rows": rows, "png": None}
            return self._views[method, style_control]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
