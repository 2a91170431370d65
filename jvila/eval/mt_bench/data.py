"""MT-bench's files: questions, judge prompts, reference and model answers, in FastChat's JSONL formats.

The package ships FastChat's MT-bench data (jvila/eval/data/mt_bench, Apache-2.0, see its NOTICE): 80 two-turn
questions in 8 categories, the 8 judge prompts, and GPT-4's reference answers for math, reasoning and coding.
Every reader names the file and line of a malformed record; nothing is silently skipped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

# FastChat's sampling temperatures per question category (fastchat/llm_judge/common.py: temperature_config);
# a category not listed samples at DEFAULT_TEMPERATURE.
TEMPERATURE_BY_CATEGORY = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
# Categories judged against a reference answer (FastChat's NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
# The reference answers FastChat's published judgments use.
DEFAULT_REFERENCE_MODEL = "gpt-4"

JUDGE_PROMPT_TYPES = ("single", "pairwise")
OUTPUT_FORMATS = ("[[rating]]", "[[A]]", "[[rating_a,rating_b]]")


class MTBenchDataError(ValueError):
    """A missing or malformed MT-bench file or record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    # A question file may pin its own sampling temperature (FastChat's `required_temperature`).
    required_temperature: float | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES


@dataclasses.dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str


def packaged_data_dir() -> Path:
    """The MT-bench data shipped with the package (question.jsonl, judge_prompts.jsonl, reference_answer/)."""
    return Path(str(resources.files("jvila.eval") / "data" / "mt_bench"))


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MTBenchDataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MTBenchDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise MTBenchDataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def append_record(path: str | Path, record: dict) -> None:
    """One record as one line, written with one call and flushed: a run that stops keeps every finished record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _field(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise MTBenchDataError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int in Python, never a question id or a score here.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MTBenchDataError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {value!r:.60}")
    return value


def _kind_name(kind) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _string_list(value: list, key: str, where: str) -> tuple[str, ...]:
    if not value or not all(isinstance(t, str) for t in value):
        raise MTBenchDataError(f"{where}: {key!r} must be a non-empty list of strings")
    return tuple(value)


def load_questions(path: str | Path) -> list[Question]:
    """Questions in file order; ids must be unique."""
    questions, seen = [], set()
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        qid = _field(obj, "question_id", int, where)
        if qid in seen:
            raise MTBenchDataError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        required = obj.get("required_temperature")
        if required is not None and (isinstance(required, bool) or not isinstance(required, (int, float))):
            raise MTBenchDataError(f"{where}: 'required_temperature' must be a number, got {required!r}")
        questions.append(Question(qid, _field(obj, "category", str, where),
                                  _string_list(_field(obj, "turns", list, where), "turns", where),
                                  None if required is None else float(required)))
    if not questions:
        raise MTBenchDataError(f"{path}: no questions")
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Judge prompts by name (single-v1, pair-v2, their math and multi-turn variants, ...)."""
    prompts = {}
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = JudgePrompt(*(_field(obj, key, str, where) for key in
                               ("name", "type", "system_prompt", "prompt_template", "output_format")))
        if prompt.type not in JUDGE_PROMPT_TYPES:
            raise MTBenchDataError(f"{where}: judge prompt type {prompt.type!r} is not one of {JUDGE_PROMPT_TYPES}")
        if prompt.output_format not in OUTPUT_FORMATS:
            raise MTBenchDataError(f"{where}: output_format {prompt.output_format!r} is not one of {OUTPUT_FORMATS}")
        prompts[prompt.name] = prompt
    return prompts


def answer_turns(record: dict, where: str) -> tuple[str, ...]:
    """The turns of an answer record's first choice (the one FastChat judges)."""
    choices = _field(record, "choices", list, where)
    if not choices or not isinstance(choices[0], dict):
        raise MTBenchDataError(f"{where}: 'choices' must be a non-empty list of objects")
    return _string_list(_field(choices[0], "turns", list, where), "choices[0].turns", where)


def load_answers(path: str | Path) -> dict[int, dict]:
    """A model's answer file as {question_id: record}; a later line for the same question replaces an earlier one."""
    answers = {}
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        qid = _field(obj, "question_id", int, where)
        answer_turns(obj, where)
        answers[qid] = obj
    return answers


def load_reference_answers(data_dir: str | Path, model: str = DEFAULT_REFERENCE_MODEL) -> dict[int, tuple[str, ...]]:
    """Reference answers (reference_answer/<model>.jsonl under the data dir) as {question_id: turns}."""
    path = Path(data_dir) / "reference_answer" / f"{model}.jsonl"
    return {qid: answer_turns(record, f"{path}") for qid, record in load_answers(path).items()}


def select_questions(questions: list[Question], *, question_ids: list[int] | None = None,
                     limit: int | None = None) -> list[Question]:
    """The questions with the given ids (in file order), then the first `limit` of those."""
    if question_ids is not None:
        known = {q.question_id for q in questions}
        missing = [qid for qid in question_ids if qid not in known]
        if missing:
            raise MTBenchDataError(f"question ids not in the question file: {missing}")
        wanted = set(question_ids)
        questions = [q for q in questions if q.question_id in wanted]
    if limit is not None:
        if limit < 1:
            raise MTBenchDataError(f"limit must be at least 1, got {limit}")
        questions = questions[:limit]
    return questions


def checked_name(name: str, what: str) -> str:
    """A model name used as a file name (FastChat names answer and judgment files after models)."""
    if not name or name.strip() != name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise MTBenchDataError(f"{what} {name!r} cannot name a file: use a name without slashes, surrounding "
                               "spaces or a leading dot")
    return name
