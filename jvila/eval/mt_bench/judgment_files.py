"""Judgment files in FastChat's formats: `model_judgment/<judge>_single.jsonl` and `<judge>_pair.jsonl`.

Single-answer grading, one line per (question, model, turn):
    {"question_id", "model", "judge": [judge_model, prompt_name], "user_prompt", "judgment", "score", "turn",
     "tstamp"}   score: the rating, -1 when the judgment held none
Pairwise grading, one line per (question, model pair, turn), both position orders:
    {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment",
     "g2_user_prompt", "g2_judgment", "turn", "tstamp"}
    game 1 shows model_1 as assistant A, game 2 shows model_2 as A; each winner is mapped back to
    "model_1", "model_2", "tie" or "error".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jvila.eval.mt_bench.data import MTBenchDataError, checked_name, read_jsonl

MODES = ("single", "pairwise-baseline", "pairwise-all")
PAIR_WINNERS = ("model_1", "model_2", "tie", "error")


def judgment_path(output_dir: str | Path, judge_model: str, mode: str) -> Path:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kind = "single" if mode == "single" else "pair"
    return Path(output_dir) / "model_judgment" / f"{checked_name(judge_model, 'judge model')}_{kind}.jsonl"


@dataclasses.dataclass(frozen=True)
class SingleJudgment:
    question_id: int
    model: str
    turn: int
    judge: tuple[str, str]
    score: int | float


@dataclasses.dataclass(frozen=True)
class PairJudgment:
    question_id: int
    model_1: str
    model_2: str
    turn: int
    judge: tuple[str, str]
    g1_winner: str
    g2_winner: str


def _get(obj: dict, key: str, kinds, where: str):
    value = obj.get(key)
    if key not in obj or not isinstance(value, kinds) or isinstance(value, bool):
        raise MTBenchDataError(f"{where}: field {key!r} is missing or not of the right type (got {value!r:.60})")
    return value


def _common(obj: dict, where: str) -> tuple[int, int, tuple[str, str]]:
    qid = _get(obj, "question_id", int, where)
    turn = _get(obj, "turn", int, where)
    if turn not in (1, 2):
        raise MTBenchDataError(f"{where}: turn must be 1 or 2, got {turn}")
    judge = _get(obj, "judge", list, where)
    if len(judge) != 2 or not all(isinstance(part, str) for part in judge):
        raise MTBenchDataError(f"{where}: 'judge' must be [judge model, prompt name], got {judge!r}")
    return qid, turn, (judge[0], judge[1])


def load_single_judgments(path: str | Path) -> list[SingleJudgment]:
    judgments = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        qid, turn, judge = _common(obj, where)
        judgments.append(SingleJudgment(qid, _get(obj, "model", str, where), turn, judge,
                                        _get(obj, "score", (int, float), where)))
    return judgments


def load_pair_judgments(path: str | Path) -> list[PairJudgment]:
    judgments = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        qid, turn, judge = _common(obj, where)
        winners = [_get(obj, key, str, where) for key in ("g1_winner", "g2_winner")]
        for winner in winners:
            if winner not in PAIR_WINNERS:
                raise MTBenchDataError(f"{where}: winner {winner!r} is not one of {PAIR_WINNERS}")
        judgments.append(PairJudgment(qid, _get(obj, "model_1", str, where), _get(obj, "model_2", str, where),
                                      turn, judge, *winners))
    return judgments


def single_key(question_id: int, model: str, turn: int, judge: tuple[str, str]) -> tuple:
    return question_id, model, turn, tuple(judge)


def pair_key(question_id: int, model_1: str, model_2: str, turn: int, judge: tuple[str, str]) -> tuple:
    # Either order of the same two models is the same comparison: both position orders are always played.
    return question_id, tuple(sorted((model_1, model_2))), turn, tuple(judge)


def existing_keys(path: Path, mode: str) -> set[tuple]:
    """Keys of the judgments already in a file, so that a run that stopped resumes where it was."""
    if not path.exists():
        return set()
    if mode == "single":
        return {single_key(j.question_id, j.model, j.turn, j.judge) for j in load_single_judgments(path)}
    return {pair_key(j.question_id, j.model_1, j.model_2, j.turn, j.judge) for j in load_pair_judgments(path)}


def answer_models(output_dir: str | Path) -> list[str]:
    """Every model with an answer file under model_answer/ (FastChat's default model list), sorted."""
    folder = Path(output_dir) / "model_answer"
    return sorted(p.name[: -len(".jsonl")] for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def checked_models(models: list[str]) -> list[str]:
    for model in models:
        checked_name(model, "model")
    if len(set(models)) != len(models):
        raise MTBenchDataError(f"a model is named twice in {models}")
    return models
