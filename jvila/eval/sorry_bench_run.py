"""Running SORRY-Bench against OpenAI-compatible endpoints: the model under test answers every question, a judge
scores every answer, and both are kept as JSONL in the benchmark's own layout, so that a second run only does
what is missing (an interrupted run resumes; a new judge reuses the answers).

    <output>/model_answer/<model>.jsonl              base prompts
    <output>/model_answer_<mutation>/<model>.jsonl   each mutation
    <output>/model_judgment/<judge model>.jsonl      every judgment: question_id, model, prompt_style, score, ...

Answers are sampled at temperature 0.7 by default: SORRY-Bench generates with FastChat, whose default that is for
categories it has no setting for.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from jvila.eval.sorry_bench import (BASE_STYLE, FulfillmentResult, Question, category_names, fulfillment_rates,
                                    load_questions, question_files)
from jvila.eval.sorry_bench_judge import JUDGE_PROMPT_NAME, answer_for_judge, judge_prompt, parse_score

log = logging.getLogger("jvila")

ANSWER_TEMPERATURE = 0.7
ANSWER_MAX_TOKENS = 1024
JUDGE_MAX_TOKENS = 1024  # the benchmark's budget; its judge answers with one digit and stops


def _file_name(model: str) -> str:
    # Model names such as "org/model" must not become sub-folders.
    return model.replace("/", "__").replace("\\", "__") + ".jsonl"


def answer_file(output_dir: str | Path, model: str, prompt_style: str) -> Path:
    folder = "model_answer" if prompt_style == BASE_STYLE else f"model_answer_{prompt_style}"
    return Path(output_dir) / folder / _file_name(model)


def judgment_file(output_dir: str | Path, judge_model: str) -> Path:
    return Path(output_dir) / "model_judgment" / _file_name(judge_model)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON ({e.msg}); fix or delete the file") from None
    return records


class _Appender:
    """Appends JSON lines from several threads; each record is flushed at once so an interruption loses nothing."""

    def __init__(self):
        self._lock = threading.Lock()

    def append(self, path: Path, record: dict) -> None:
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _run_parallel(work, items, parallel: int) -> None:
    if parallel <= 1:
        for item in items:
            work(item)
        return
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        # list() re-raises the first failure here, after the running requests finish.
        list(pool.map(work, items))


def generate_answers(chat, questions: list[Question], *, output_dir: str | Path, model: str,
                     temperature: float = ANSWER_TEMPERATURE, max_tokens: int = ANSWER_MAX_TOKENS,
                     seed: int | None = None, parallel: int = 8) -> dict[tuple[str, int], str]:
    """{(prompt style, question_id): answer}. `chat` has `chat(messages, temperature=, max_tokens=, seed=)`; only
    questions without a stored answer are sent. With a seed, question i is sampled with seed + i."""
    answers: dict[tuple[str, int], str] = {}
    for style in dict.fromkeys(q.prompt_style for q in questions):
        for record in _read_jsonl(answer_file(output_dir, model, style)):
            answers[(style, record["question_id"])] = record["choices"][0]["turns"][0]
    todo = [q for q in questions if (q.prompt_style, q.question_id) not in answers]
    log.info("%s: %d answers to generate (%d stored)", model, len(todo), len(questions) - len(todo))
    appender = _Appender()

    def answer(question: Question) -> None:
        text = chat.chat([{"role": "user", "content": question.prompt}], temperature=temperature,
                         max_tokens=max_tokens, seed=None if seed is None else seed + question.question_id)
        appender.append(answer_file(output_dir, model, question.prompt_style), {
            "question_id": question.question_id, "answer_id": uuid.uuid4().hex, "model_id": model,
            "prompt_style": question.prompt_style, "choices": [{"index": 0, "turns": [text]}], "tstamp": time.time()})
        answers[(question.prompt_style, question.question_id)] = text

    _run_parallel(answer, todo, parallel)
    return answers


def judge_answers(judge, questions: list[Question], answers: dict[tuple[str, int], str], *,
                  output_dir: str | Path, model: str, judge_model: str, base_prompts: dict[int, str] | None = None,
                  max_tokens: int = JUDGE_MAX_TOKENS, parallel: int = 8) -> dict[tuple[str, int], float | None]:
    """{(prompt style, question_id): score or None}. The judge sees the base request of each question (its own
    prompt when `base_prompts` lacks it) and the answer, decoded for cipher mutations; it decodes greedily."""
    path = judgment_file(output_dir, judge_model)
    scores = {(r["prompt_style"], r["question_id"]): r["score"] for r in _read_jsonl(path)
              if r.get("model") == model and "prompt_style" in r}
    todo = [q for q in questions if (q.prompt_style, q.question_id) not in scores]
    log.info("%s: %d answers to judge with %s (%d stored)", model, len(todo), judge_model,
             len(questions) - len(todo))
    appender = _Appender()
    base_prompts = base_prompts or {}

    def grade(question: Question) -> None:
        request = base_prompts.get(question.question_id, question.prompt)
        prompt = judge_prompt(request, answer_for_judge(question.prompt_style,
                                                        answers[(question.prompt_style, question.question_id)]))
        judgment = judge.chat([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens)
        score = parse_score(judgment)
        appender.append(path, {"question_id": question.question_id, "model": model,
                               "prompt_style": question.prompt_style, "judge": [judge_model, JUDGE_PROMPT_NAME],
                               "user_prompt": prompt, "judgment": judgment, "score": score, "turn": 1,
                               "tstamp": time.time()})
        scores[(question.prompt_style, question.question_id)] = score

    _run_parallel(grade, todo, parallel)
    return scores


def _first_of_each_style(questions: list[Question], limit: int) -> list[Question]:
    taken: dict[str, int] = {}
    kept = []
    for question in questions:
        if taken.get(question.prompt_style, 0) < limit:
            kept.append(question)
            taken[question.prompt_style] = taken.get(question.prompt_style, 0) + 1
    return kept


def run_sorry_bench(*, data_dir: str | Path, output_dir: str | Path, base_url: str, model: str,
                    judge_url: str, judge_model: str, api_key: str | None = None, judge_api_key: str | None = None,
                    prompt_styles: list[str] | None = None, limit: int | None = None,
                    temperature: float = ANSWER_TEMPERATURE, seed: int | None = None,
                    max_tokens: int = ANSWER_MAX_TOKENS, judge_max_tokens: int = JUDGE_MAX_TOKENS,
                    parallel: int = 8, heatmap: str | Path | None = None, chat=None,
                    judge=None) -> FulfillmentResult:
    """Answer, judge and score. `chat` / `judge` replace the HTTP clients built from the URLs (a seam for
    in-process models)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    questions = load_questions(data_dir, prompt_styles)
    if limit is not None:
        questions = _first_of_each_style(questions, limit)
    base_prompts = {}
    if BASE_STYLE in question_files(data_dir):
        base_prompts = {q.question_id: q.prompt for q in load_questions(data_dir, [BASE_STYLE])}
    else:
        log.warning("no question.jsonl in %s: the judge sees each mutated prompt instead of its base request",
                    data_dir)
    if chat is None or judge is None:
        from jvila.eval.chat_client import ChatClient

        chat = chat or ChatClient(base_url, model, api_key=api_key)
        judge = judge or ChatClient(judge_url, judge_model, api_key=judge_api_key)
    answers = generate_answers(chat, questions, output_dir=output_dir, model=model, temperature=temperature,
                               max_tokens=max_tokens, seed=seed, parallel=parallel)
    scores = judge_answers(judge, questions, answers, output_dir=output_dir, model=model, judge_model=judge_model,
                           base_prompts=base_prompts, max_tokens=judge_max_tokens, parallel=parallel)
    result = fulfillment_rates([(q, scores[(q.prompt_style, q.question_id)]) for q in questions],
                               category_names(data_dir, sorted({q.category for q in questions})))
    if heatmap:
        result.plot(heatmap)
        log.info("wrote %s", heatmap)
    return result
