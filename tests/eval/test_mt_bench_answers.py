"""Answer generation with a scripted chat function: per-category temperatures, two-turn conversations, FastChat's
answer records, resuming without asking again, and the data loaders' errors on malformed files."""

import json
import random

import pytest

from jvila.eval.mt_bench.answers import (
    answer_path,
    generate_answers,
    sampling_temperature,
)
from jvila.eval.mt_bench.data import (
    MTBenchDataError,
    Question,
    load_answers,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    packaged_data_dir,
    select_questions,
)


class ScriptedChat:
    """Answers each request with a fresh random text; records what it was asked."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.calls = []

    def __call__(self, messages, *, temperature, max_tokens):
        reply = "".join(self.rng.choice("abcdefgh ") for _ in range(self.rng.randint(1, 30)))
        self.calls.append({"messages": [dict(m) for m in messages], "temperature": temperature,
                           "max_tokens": max_tokens, "reply": reply})
        return reply


def test_packaged_data_is_fastchats_mt_bench():
    data = packaged_data_dir()
    questions = load_questions(data / "question.jsonl")
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    by_category = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q.question_id)
    assert {c: (min(ids), len(ids)) for c, ids in by_category.items()} == {
        "writing": (81, 10), "roleplay": (91, 10), "reasoning": (101, 10), "math": (111, 10),
        "coding": (121, 10), "extraction": (131, 10), "stem": (141, 10), "humanities": (151, 10)}
    prompts = load_judge_prompts(data / "judge_prompts.jsonl")
    assert sorted(prompts) == sorted(["pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn",
                                      "single-v1", "single-math-v1", "single-v1-multi-turn",
                                      "single-math-v1-multi-turn"])
    references = load_reference_answers(data)
    needing = [q.question_id for q in questions if q.needs_reference]
    assert len(needing) == 30 and sorted(references) == sorted(needing)
    assert all(len(turns) == 2 for turns in references.values())
    assert (data / "LICENSE").is_file() and "FastChat" in (data / "NOTICE").read_text()


@pytest.mark.parametrize("category, temperature", [("writing", 0.7), ("roleplay", 0.7), ("stem", 0.1),
                                                   ("humanities", 0.1), ("math", 0.0), ("reasoning", 0.0),
                                                   ("coding", 0.0), ("extraction", 0.0), ("unheard-of", 0.7)])
def test_temperature_per_category(category, temperature):
    question = Question(1, category, ("hi",))
    assert sampling_temperature(question) == temperature
    assert sampling_temperature(question, force_temperature=0.3) == 0.3
    assert sampling_temperature(Question(1, category, ("hi",), required_temperature=1.5)) == 1.5


def test_two_turns_in_one_conversation_written_as_fastchat_records(tmp_path):
    questions = select_questions(load_questions(packaged_data_dir() / "question.jsonl"), question_ids=[111, 81, 141])
    chat = ScriptedChat(7)
    path = generate_answers(chat, questions, output_dir=tmp_path, model_id="m-1", max_tokens=33, parallel=2,
                            system="Be brief.")
    assert path == tmp_path / "model_answer" / "m-1.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [81, 111, 141]  # sorted by question id
    calls_by_first_turn = {}
    for call in chat.calls:
        calls_by_first_turn.setdefault(call["messages"][1]["content"], []).append(call)
    for record, question in zip(lines, sorted(questions, key=lambda q: q.question_id)):
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "m-1" and isinstance(record["tstamp"], float)
        first, second = calls_by_first_turn[question.turns[0]]
        assert record["choices"] == [{"index": 0, "turns": [first["reply"], second["reply"]]}]
        # Turn 2 is asked after turn 1 and its answer, with the same system message.
        assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": question.turns[0]}]
        assert second["messages"] == first["messages"] + [
            {"role": "assistant", "content": first["reply"]}, {"role": "user", "content": question.turns[1]}]
        assert first["temperature"] == second["temperature"] == sampling_temperature(question)
        assert first["max_tokens"] == 33


def test_resuming_asks_only_unanswered_questions(tmp_path):
    questions = select_questions(load_questions(packaged_data_dir() / "question.jsonl"), limit=3)
    generate_answers(ScriptedChat(1), questions[:2], output_dir=tmp_path, model_id="m", max_tokens=8)
    before = load_answers(answer_path(tmp_path, "m"))
    chat = ScriptedChat(2)
    generate_answers(chat, questions, output_dir=tmp_path, model_id="m", max_tokens=8, num_choices=2)
    after = load_answers(answer_path(tmp_path, "m"))
    assert {call["messages"][0]["content"] for call in chat.calls} == {questions[2].turns[0]}
    assert len(chat.calls) == 4  # two choices × two turns, for the one new question
    assert {qid: after[qid] for qid in before} == before
    assert [c["index"] for c in after[questions[2].question_id]["choices"]] == [0, 1]
    # Nothing left to ask: no call at all.
    idle = ScriptedChat(3)
    generate_answers(idle, questions, output_dir=tmp_path, model_id="m", max_tokens=8)
    assert idle.calls == []


def test_a_failing_endpoint_keeps_the_finished_answers(tmp_path):
    questions = select_questions(load_questions(packaged_data_dir() / "question.jsonl"), limit=3)
    chat = ScriptedChat(4)

    def flaky(messages, **kw):
        if messages[-1]["content"] == questions[1].turns[1]:
            raise ConnectionError("server went away")
        return chat(messages, **kw)

    with pytest.raises(ConnectionError):
        generate_answers(flaky, questions, output_dir=tmp_path, model_id="m", max_tokens=8)
    assert sorted(load_answers(answer_path(tmp_path, "m"))) == [questions[0].question_id]


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1, "category": "math", "turns": ["a"]}\n{"question_id": 2', "questions.jsonl:2: not valid JSON"),
    ('[1, 2]', "questions.jsonl:1: expected a JSON object"),
    ('{"question_id": "7", "category": "math", "turns": ["a"]}', "'question_id' must be an integer"),
    ('{"question_id": 7, "category": "math", "turns": []}', "'turns' must be a non-empty list of strings"),
    ('{"question_id": 7, "turns": ["a"]}', "missing field 'category'"),
    ('{"question_id": 7, "category": "m", "turns": ["a"]}\n\n{"question_id": 7, "category": "m", "turns": ["b"]}',
     "questions.jsonl:3: question_id 7 appears twice"),
    ("", "no questions"),
])
def test_malformed_question_files_are_named_errors(tmp_path, content, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(content)
    with pytest.raises(MTBenchDataError, match=message.replace("[", r"\[")):
        load_questions(path)


def test_bad_selections_and_names_are_errors(tmp_path):
    questions = load_questions(packaged_data_dir() / "question.jsonl")
    with pytest.raises(MTBenchDataError, match=r"\[999\]"):
        select_questions(questions, question_ids=[81, 999])
    with pytest.raises(MTBenchDataError, match="cannot name a file"):
        answer_path(tmp_path, "org/model")
    with pytest.raises(MTBenchDataError, match="no such file"):
        load_questions(tmp_path / "missing.jsonl")
    bad_answers = tmp_path / "model_answer" / "m.jsonl"
    bad_answers.parent.mkdir()
    bad_answers.write_text('{"question_id": 81, "choices": [{"index": 0, "turns": "text"}]}\n')
    with pytest.raises(MTBenchDataError, match="m.jsonl:1: .*turns"):
        generate_answers(ScriptedChat(0), questions[:1], output_dir=tmp_path, model_id="m")
