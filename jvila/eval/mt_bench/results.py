"""MT-bench tables from judgment files, computed as FastChat's show_result.py computes them.

Single-answer grading: judgments scored -1 (no rating found) are dropped; a model's turn-1 and turn-2 scores
are the means over that turn's judgments, and its MT-bench score is the mean over all of them (not the mean
of the two turn means). The category table is the mean over both turns per category (FastChat's radar plot).

Pairwise grading: judgments where either game is an "error" are dropped; when the two position orders
disagree, or game 1 is a tie, both models get a tie; otherwise the winner gets a win and the other a loss.
win_rate = win / n, loss_rate = loss / n, win_rate_adjusted = (win + tie / 2) / n, the sort key. In
pairwise-baseline mode only comparisons with the baseline count and the baseline's own row is left out.
FastChat's --model-list filter on pairwise results keeps a judgment when its model_1 is listed; so does ours.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from jvila.eval.mt_bench.data import MTBenchDataError, Question
from jvila.eval.mt_bench.judgment_files import PairJudgment, SingleJudgment
from jvila.eval.mt_bench.verdicts import NO_RATING


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    model: str
    turn_1: float | None
    turn_2: float | None
    score: float | None  # the mean over every kept judgment of both turns; None when none was kept
    judged: int  # judgments kept
    failed: int  # judgments dropped: the judge gave no rating


@dataclasses.dataclass(frozen=True)
class WinRow:
    model: str
    win: int
    loss: int
    tie: int
    win_rate: float
    loss_rate: float
    win_rate_adjusted: float


@dataclasses.dataclass(frozen=True)
class Tables:
    """The per-model table (best first), then {model: {category: value}} and {model: {turn: value}}.

    value: the mean score (single grading) or the adjusted win rate (pairwise); a missing entry has no data.
    """

    mode: str
    rows: list
    by_category: dict[str, dict[str, float]]
    by_turn: dict[str, dict[int, float]]
    categories: list[str]  # in question-file order

    def to_json(self) -> dict:
        return {"mode": self.mode, "models": [dataclasses.asdict(r) for r in self.rows],
                "by_category": self.by_category,
                "by_turn": {m: {str(t): v for t, v in turns.items()} for m, turns in self.by_turn.items()}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _category_of(questions: list[Question]):
    categories = {q.question_id: q.category for q in questions}

    def category(question_id: int) -> str:
        if question_id not in categories:
            raise MTBenchDataError(f"a judgment is about question {question_id}, which the question file lacks")
        return categories[question_id]

    return category


def _ordered_categories(questions: list[Question], seen: set[str]) -> list[str]:
    return [c for c in dict.fromkeys(q.category for q in questions) if c in seen]


def single_tables(judgments: list[SingleJudgment], questions: list[Question],
                  models: list[str] | None = None) -> Tables:
    category = _category_of(questions)
    if models is not None:
        judgments = [j for j in judgments if j.model in models]
    failed = defaultdict(int)
    scores = defaultdict(list)
    by_turn = defaultdict(lambda: defaultdict(list))
    by_category = defaultdict(lambda: defaultdict(list))
    for j in judgments:
        if j.score == NO_RATING:
            failed[j.model] += 1
            continue
        scores[j.model].append(j.score)
        by_turn[j.model][j.turn].append(j.score)
        by_category[j.model][category(j.question_id)].append(j.score)
    rows = [ScoreRow(m, _mean(by_turn[m][1]), _mean(by_turn[m][2]), _mean(s), len(s), failed[m])
            for m, s in scores.items()]
    # A model whose every judgment failed still gets a row (no score), so that the failure is visible.
    rows += [ScoreRow(m, None, None, None, 0, n) for m, n in failed.items() if m not in scores]
    rows.sort(key=lambda r: (-r.score if r.judged else float("inf"), r.model))
    seen = {c for cats in by_category.values() for c in cats}
    return Tables("single", rows, {m: {c: _mean(v) for c, v in cats.items()} for m, cats in by_category.items()},
                  {m: {t: _mean(v) for t, v in sorted(turns.items())} for m, turns in by_turn.items()},
                  _ordered_categories(questions, seen))


def _outcomes(j: PairJudgment) -> list[tuple[str, str]]:
    """(model, "win"|"loss"|"tie") for both models of one kept judgment."""
    if j.g1_winner == "tie" or j.g1_winner != j.g2_winner:
        return [(j.model_1, "tie"), (j.model_2, "tie")]
    winner, loser = (j.model_1, j.model_2) if j.g1_winner == "model_1" else (j.model_2, j.model_1)
    return [(winner, "win"), (loser, "loss")]


def _adjusted(counts: dict[str, int]) -> float:
    return (counts["win"] + 0.5 * counts["tie"]) / sum(counts.values())


def pairwise_tables(judgments: list[PairJudgment], questions: list[Question], *, models: list[str] | None = None,
                    baseline: str | None = None) -> Tables:
    category = _category_of(questions)
    totals = defaultdict(lambda: defaultdict(int))
    by_turn = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    by_category = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for j in judgments:
        if "error" in (j.g1_winner, j.g2_winner):
            continue
        if models is not None and j.model_1 not in models:
            continue
        if baseline is not None and baseline not in (j.model_1, j.model_2):
            continue
        for model, outcome in _outcomes(j):
            totals[model][outcome] += 1
            by_turn[model][j.turn][outcome] += 1
            by_category[model][category(j.question_id)][outcome] += 1
    rows = []
    for model, c in totals.items():
        if model == baseline:
            continue
        n = c["win"] + c["loss"] + c["tie"]
        rows.append(WinRow(model, c["win"], c["loss"], c["tie"], c["win"] / n, c["loss"] / n, _adjusted(c)))
    rows.sort(key=lambda r: (-r.win_rate_adjusted, r.model))
    shown = [r.model for r in rows]
    seen = {cat for m in shown for cat in by_category[m]}
    return Tables("pairwise-baseline" if baseline else "pairwise-all", rows,
                  {m: {cat: _adjusted(c) for cat, c in by_category[m].items()} for m in shown},
                  {m: {t: _adjusted(c) for t, c in sorted(by_turn[m].items())} for m in shown},
                  _ordered_categories(questions, seen))


def _cell(value, digits: int) -> str:
    if value is None:  # no data
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def format_tables(tables: Tables) -> str:
    """The per-model table, then per category (and per turn for pairwise grading), as aligned plain text."""
    if tables.mode == "single":
        title = "MT-bench score (single-answer grading, 1-10; -1 judgments dropped)"
        headers = ["model", "turn 1", "turn 2", "score", "judged", "failed"]
        body = [[r.model, _cell(r.turn_1, 2), _cell(r.turn_2, 2), _cell(r.score, 2), _cell(r.judged, 0),
                 _cell(r.failed, 0)] for r in tables.rows]
        value_name, digits = "mean score", 2
    else:
        title = f"MT-bench win rates ({tables.mode}; a position disagreement counts as a tie)"
        headers = ["model", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"]
        body = [[r.model, _cell(r.win, 0), _cell(r.loss, 0), _cell(r.tie, 0), _cell(r.win_rate, 3),
                 _cell(r.loss_rate, 3), _cell(r.win_rate_adjusted, 3)] for r in tables.rows]
        value_name, digits = "adjusted win rate", 3
    if not tables.rows:
        return f"{title}\n(no judgments)"
    models = [r.model for r in tables.rows]
    categories = [[m] + [_cell(tables.by_category.get(m, {}).get(c), digits) for c in tables.categories]
                  for m in models]
    turns = sorted({t for m in models for t in tables.by_turn.get(m, {})})
    per_turn = [[m] + [_cell(tables.by_turn.get(m, {}).get(t), digits) for t in turns] for m in models]
    sections = [f"{title}\n{_table(headers, body)}",
                f"By category ({value_name}, both turns)\n{_table(['model', *tables.categories], categories)}"]
    if tables.mode != "single":  # the single-grading table has its turn columns already
        sections.append(f"By turn ({value_name})\n{_table(['model', *(f'turn {t}' for t in turns)], per_turn)}")
    return "\n\n".join(sections)
