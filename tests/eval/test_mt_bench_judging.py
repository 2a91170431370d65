"""Judging with scripted judges: which prompt each question and turn gets, the exact messages the judge sees,
both position orders in pairwise grading, FastChat's judgment records, resuming, and errors on missing data."""

import json
import random

import pytest

from jvila.eval.mt_bench.answers import answer_path
from jvila.eval.mt_bench.data import (
    MTBenchDataError,
    append_record,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    packaged_data_dir,
    select_questions,
)
from jvila.eval.mt_bench.judging import run_judgments
from jvila.eval.mt_bench.verdicts import parse_rating

DATA = packaged_data_dir()
PROMPTS = load_judge_prompts(DATA / "judge_prompts.jsonl")
REFERENCES = load_reference_answers(DATA)
# Raw prompt records, read here without the package's loader, to build the expected judge messages.
RAW_PROMPTS = {p["name"]: p for p in map(json.loads, (DATA / "judge_prompts.jsonl").read_text().splitlines())}


def _questions(*ids):
    return select_questions(load_questions(DATA / "question.jsonl"), question_ids=list(ids))


def _write_answers(folder, model, questions, rng):
    answers = {}
    for q in questions:
        turns = [f"{model} says " + "".join(rng.choice("xyz{}") for _ in range(rng.randint(3, 12))) for _ in q.turns]
        append_record(answer_path(folder, model), {"question_id": q.question_id, "answer_id": "x", "model_id": model,
                                                   "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0})
        answers[q.question_id] = turns
    return answers


class ScriptedJudge:
    """A judge that answers with `reply(system, user)`; records the requests."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, messages, *, temperature, max_tokens):
        assert [m["role"] for m in messages] == ["system", "user"]
        self.calls.append({"system": messages[0]["content"], "user": messages[1]["content"],
                           "temperature": temperature, "max_tokens": max_tokens})
        return self.reply(messages[0]["content"], messages[1]["content"])


def _expected_single_prompt(name, q, turns, reference):
    fields = ({"question": q.turns[0], "answer": turns[0]} if "multi-turn" not in name else
              {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": turns[0], "answer_2": turns[1]})
    if reference is not None:
        fields["ref_answer_1"] = reference[0]
        if "multi-turn" in name:
            fields["ref_answer_2"] = reference[1]
    return RAW_PROMPTS[name]["prompt_template"].format(**fields)


def test_single_grading_uses_fastchats_prompts_and_records(tmp_path):
    questions = _questions(81, 111, 101)  # writing (plain), math and reasoning (against a reference)
    rng = random.Random(0)
    answers = {m: _write_answers(tmp_path, m, questions, rng) for m in ("alpha", "beta")}
    ratings = iter(rng.sample(range(1, 11), 10) * 2)
    by_question = {q.question_id: q for q in questions}

    def reply(system, user):
        if by_question[101].turns[0] in user and by_question[101].turns[1] not in user and "beta says" in user:
            return "I cannot decide."  # malformed: no rating
        return f"Explanation. Rating: [[{next(ratings)}]]"

    judge = ScriptedJudge(reply)
    path = run_judgments(judge, questions, output_dir=tmp_path, judge_model="judge-x", models=["alpha", "beta"],
                         judge_prompts=PROMPTS, references=REFERENCES, max_tokens=77)
    assert path == tmp_path / "model_judgment" / "judge-x_single.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(judge.calls) == 3 * 2 * 2
    # FastChat's order: plain questions, then reference-guided ones (in question-file order), turn 1 first.
    assert [(r["question_id"], r["turn"], r["model"]) for r in records] == [
        (81, 1, "alpha"), (81, 1, "beta"), (101, 1, "alpha"), (101, 1, "beta"), (111, 1, "alpha"), (111, 1, "beta"),
        (81, 2, "alpha"), (81, 2, "beta"), (101, 2, "alpha"), (101, 2, "beta"), (111, 2, "alpha"), (111, 2, "beta")]
    for record, call in zip(records, judge.calls):
        q = by_question[record["question_id"]]
        multi = "-multi-turn" if record["turn"] == 2 else ""
        name = ("single-math-v1" if q.category in ("math", "reasoning") else "single-v1") + multi
        reference = REFERENCES[q.question_id] if q.category in ("math", "reasoning") else None
        expected = _expected_single_prompt(name, q, answers[record["model"]][q.question_id], reference)
        assert record["judge"] == ["judge-x", name]
        assert call["system"] == RAW_PROMPTS[name]["system_prompt"] and call["user"] == expected
        assert record["user_prompt"] == expected
        assert call["temperature"] == 0 and call["max_tokens"] == 77
        assert record["score"] == parse_rating(record["judgment"])
        assert set(record) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    failed = [(r["question_id"], r["model"], r["turn"]) for r in records if r["score"] == -1]
    assert failed == [(101, "beta", 1)]

    # A second run finds everything judged and asks nothing.
    again = ScriptedJudge(reply)
    run_judgments(again, questions, output_dir=tmp_path, judge_model="judge-x", models=["alpha", "beta"],
                  judge_prompts=PROMPTS, references=REFERENCES)
    assert again.calls == [] and len(path.read_text().splitlines()) == 12


def _slot_owner(user, slot, models):
    """Which model's answer the judge was shown as assistant `slot` (A or B), from the prompt text."""
    after = user.split(f"[The Start of Assistant {slot}'s Answer]\n", 1)[1]
    return next(m for m in models if after.startswith(f"{m} says"))


def test_pairwise_plays_both_position_orders(tmp_path):
    questions = _questions(91, 121)  # roleplay (plain) and coding (against a reference)
    models = ["m1", "m2", "m3"]
    rng = random.Random(1)
    for m in models:
        _write_answers(tmp_path, m, questions, rng)
    strength = {"m1": 3, "m2": 1, "m3": 2}

    def fair(system, user):
        # Multi-turn pairwise prompts show whole conversations: read the owner from the first answer shown.
        if "<|The Start of Assistant A's Conversation with User|>" in user:
            a = next(m for m in models if user.split("### Assistant A:\n", 1)[1].startswith(f"{m} says"))
            b = next(m for m in models if user.split("### Assistant B:\n", 1)[1].startswith(f"{m} says"))
        else:
            a, b = _slot_owner(user, "A", models), _slot_owner(user, "B", models)
        return "[[A]]" if strength[a] > strength[b] else "[[B]]"

    judge = ScriptedJudge(fair)
    path = run_judgments(judge, questions, output_dir=tmp_path, judge_model="j", models=models, judge_prompts=PROMPTS,
                         references=REFERENCES, mode="pairwise-all")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name == "j_pair.jsonl" and len(records) == 2 * 2 * 3 and len(judge.calls) == 2 * len(records)
    for record in records:
        # A judge without position bias agrees with itself across the swap.
        better = max(record["model_1"], record["model_2"], key=strength.get)
        expected = "model_1" if better == record["model_1"] else "model_2"
        assert record["g1_winner"] == record["g2_winner"] == expected
        assert record["g1_user_prompt"] != record["g2_user_prompt"]
        name = "pair-math-v1" if record["question_id"] == 121 else "pair-v2"
        assert record["judge"] == ["j", name + ("-multi-turn" if record["turn"] == 2 else "")]
        if record["question_id"] == 121:
            assert REFERENCES[121][0] in record["g1_user_prompt"]
    assert {(r["model_1"], r["model_2"]) for r in records} == {("m1", "m2"), ("m1", "m3"), ("m2", "m3")}

    # A judge that always says A disagrees with itself once the answers swap places: g1 model_1, g2 model_2.
    biased = ScriptedJudge(lambda system, user: "My verdict: [[A]]")
    other = tmp_path / "biased"
    for m in models:
        _write_answers(other, m, questions, rng)
    path = run_judgments(biased, questions, output_dir=other, judge_model="j", models=models, judge_prompts=PROMPTS,
                         references=REFERENCES, mode="pairwise-baseline", baseline="m3")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["model_1"], r["model_2"]) for r in records} == {("m1", "m3"), ("m2", "m3")}
    assert all((r["g1_winner"], r["g2_winner"]) == ("model_1", "model_2") for r in records)


def test_missing_answers_references_and_prompts_are_named(tmp_path):
    questions = _questions(81, 111)
    _write_answers(tmp_path, "a", questions[:1], random.Random(2))
    judge = ScriptedJudge(lambda s, u: "[[5]]")
    kwargs = {"output_dir": tmp_path, "judge_model": "j", "judge_prompts": PROMPTS, "references": REFERENCES}
    with pytest.raises(MTBenchDataError, match="model 'a' has no answer to question 111"):
        run_judgments(judge, questions, models=["a"], **kwargs)
    with pytest.raises(MTBenchDataError, match="no answers for model 'b'"):
        run_judgments(judge, questions[:1], models=["a", "b"], **kwargs)
    _write_answers(tmp_path, "c", questions, random.Random(3))
    with pytest.raises(MTBenchDataError, match="question 111 \\(math\\) needs a reference answer"):
        run_judgments(judge, questions, models=["c"], **{**kwargs, "references": {}})
    with pytest.raises(MTBenchDataError, match="no 'pair-v2'"):
        run_judgments(judge, questions[:1], models=["a", "c"], mode="pairwise-all",
                      **{**kwargs, "judge_prompts": {"single-v1": PROMPTS["single-v1"]}})
    with pytest.raises(MTBenchDataError, match="needs two different models"):
        run_judgments(judge, questions[:1], models=["a"], mode="pairwise-all", **kwargs)
    with pytest.raises(MTBenchDataError, match="no models to judge"):
        run_judgments(judge, questions[:1], models=[], **kwargs)
    assert judge.calls == []
