"""MT-bench tables: a hand-computed case, and random judgment sets against an independent computation of
FastChat's show_result.py rules (written here as plain counting, not with the module's grouping)."""

import json
import random

import pytest

from jvila.eval.mt_bench.data import MTBenchDataError, Question
from jvila.eval.mt_bench.judgment_files import (
    PairJudgment,
    SingleJudgment,
    load_pair_judgments,
    load_single_judgments,
)
from jvila.eval.mt_bench.results import format_tables, pairwise_tables, single_tables

CATEGORIES = ["writing", "math", "coding"]
QUESTIONS = [Question(i, CATEGORIES[i % 3], ("q1", "q2")) for i in range(1, 13)]
JUDGE = ("j", "single-v1")


def test_single_scores_by_hand():
    judgments = [SingleJudgment(1, "a", 1, JUDGE, 8), SingleJudgment(1, "a", 2, JUDGE, 6),
                 SingleJudgment(2, "a", 1, JUDGE, 9), SingleJudgment(2, "a", 2, JUDGE, -1),
                 SingleJudgment(1, "b", 1, JUDGE, 3), SingleJudgment(2, "b", 1, JUDGE, 4.5),
                 SingleJudgment(2, "c", 1, JUDGE, -1)]
    tables = single_tables(judgments, QUESTIONS)
    a, b, c = tables.rows
    # a: turn 1 (8 + 9) / 2, turn 2 only 6 (the -1 is dropped), score (8 + 6 + 9) / 3, not the mean of turn means.
    assert (a.model, a.turn_1, a.turn_2, a.score, a.judged, a.failed) == ("a", 8.5, 6, 23 / 3, 3, 1)
    assert (b.model, b.turn_1, b.turn_2, b.score, b.judged, b.failed) == ("b", 3.75, None, 3.75, 2, 0)
    assert (c.model, c.turn_1, c.turn_2, c.score, c.judged, c.failed) == ("c", None, None, None, 0, 1)
    assert tables.by_category["a"] == {"math": 7.0, "coding": 9.0}  # question 1 is math, 2 coding
    assert tables.categories == ["math", "coding"]
    text = format_tables(tables)
    assert "7.67" in text and "3.75" in text and "By category" in text
    assert single_tables(judgments, QUESTIONS, models=["b"]).rows == [b]


def test_pairwise_win_rates_by_hand():
    def pair(qid, m1, m2, g1, g2, turn=1):
        return PairJudgment(qid, m1, m2, turn, ("j", "pair-v2"), g1, g2)

    judgments = [pair(1, "a", "base", "model_1", "model_1"),  # a wins
                 pair(2, "a", "base", "model_1", "model_2"),  # the two orders disagree: a tie
                 pair(3, "a", "base", "tie", "tie"),  # tie
                 pair(4, "base", "a", "model_1", "model_1"),  # base wins
                 pair(5, "a", "base", "model_1", "error"),  # dropped
                 pair(6, "b", "base", "model_2", "model_2", turn=2),  # base beats b
                 pair(7, "a", "b", "model_1", "model_1")]  # not against the baseline
    tables = pairwise_tables(judgments, QUESTIONS, baseline="base")
    a, b = tables.rows
    assert (a.model, a.win, a.loss, a.tie) == ("a", 1, 1, 2)
    assert (a.win_rate, a.loss_rate, a.win_rate_adjusted) == (0.25, 0.25, 0.5)
    assert (b.model, b.win, b.loss, b.tie, b.win_rate_adjusted) == ("b", 0, 1, 0, 0.0)
    assert tables.by_turn == {"a": {1: 0.5}, "b": {2: 0.0}}
    everyone = pairwise_tables(judgments, QUESTIONS)
    assert {r.model: (r.win, r.loss, r.tie) for r in everyone.rows} == {
        "a": (2, 1, 2), "base": (2, 1, 2), "b": (0, 2, 0)}
    text = format_tables(tables)
    assert "win_rate_adjusted" in text and "By turn" in text and "0.500" in text


def _independent_single(judgments):
    result = {}
    for model in {j.model for j in judgments}:
        kept = [j for j in judgments if j.model == model and j.score != -1]
        if kept:
            result[model] = (sum(j.score for j in kept) / len(kept), len(kept))
    return result


def _independent_pairwise(judgments):
    points = {}
    for j in judgments:
        if j.g1_winner == "error" or j.g2_winner == "error":
            continue
        consistent = j.g1_winner == j.g2_winner and j.g1_winner != "tie"
        for me, other, label in ((j.model_1, j.model_2, "model_1"), (j.model_2, j.model_1, "model_2")):
            w, l, t = points.get(me, (0, 0, 0))
            if not consistent:
                t += 1
            elif j.g1_winner == label:
                w += 1
            else:
                l += 1
            points[me] = (w, l, t)
    return points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_judgments_match_an_independent_count(seed):
    rng = random.Random(seed)
    models = [f"m{i}" for i in range(rng.randint(2, 5))]
    singles = [SingleJudgment(rng.choice(QUESTIONS).question_id, rng.choice(models), rng.choice((1, 2)), JUDGE,
                              rng.choice([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 7.5])) for _ in range(rng.randint(30, 90))]
    expected = _independent_single(singles)
    rows = single_tables(singles, QUESTIONS).rows
    got = {r.model: (r.score, r.judged) for r in rows if r.judged}
    assert got.keys() == expected.keys()
    for model, (score, n) in expected.items():
        assert got[model][1] == n and got[model][0] == pytest.approx(score, rel=1e-12)  # float sums in another order
    scores = [r.score for r in rows if r.judged]
    assert scores == sorted(scores, reverse=True)

    pairs = []
    for _ in range(rng.randint(30, 90)):
        m1, m2 = rng.sample(models, 2)
        pairs.append(PairJudgment(rng.choice(QUESTIONS).question_id, m1, m2, rng.choice((1, 2)), ("j", "pair-v2"),
                                  *(rng.choice(["model_1", "model_2", "tie", "error"]) for _ in range(2))))
    expected = _independent_pairwise(pairs)
    tables = pairwise_tables(pairs, QUESTIONS)
    assert {r.model: (r.win, r.loss, r.tie) for r in tables.rows} == expected
    for r in tables.rows:
        n = r.win + r.loss + r.tie
        assert r.win_rate_adjusted == pytest.approx((r.win + r.tie / 2) / n, rel=1e-12)
    adjusted = [r.win_rate_adjusted for r in tables.rows]
    assert adjusted == sorted(adjusted, reverse=True)


def test_judgment_files_are_read_with_named_errors(tmp_path):
    path = tmp_path / "j_single.jsonl"
    good = {"question_id": 1, "model": "a", "judge": ["j", "single-v1"], "user_prompt": "p", "judgment": "[[5]]",
            "score": 5, "turn": 1, "tstamp": 0.0}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "turn": 3}) + "\n")
    with pytest.raises(MTBenchDataError, match="j_single.jsonl:2: turn must be 1 or 2"):
        load_single_judgments(path)
    path.write_text(json.dumps({**good, "score": "5"}) + "\n")
    with pytest.raises(MTBenchDataError, match="j_single.jsonl:1: field 'score'"):
        load_single_judgments(path)
    pair = tmp_path / "j_pair.jsonl"
    pair.write_text(json.dumps({"question_id": 1, "model_1": "a", "model_2": "b", "g1_winner": "A",
                                "g2_winner": "tie", "judge": ["j", "pair-v2"], "turn": 1}) + "\n")
    with pytest.raises(MTBenchDataError, match="winner 'A' is not one of"):
        load_pair_judgments(pair)
    with pytest.raises(MTBenchDataError, match="question 99"):
        single_tables([SingleJudgment(99, "a", 1, JUDGE, 5)], QUESTIONS)
