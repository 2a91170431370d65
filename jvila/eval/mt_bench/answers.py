"""Answer generation: each question's turns asked in one conversation, through an OpenAI-compatible chat endpoint.

As FastChat's gen_api_answer.py: the sampling temperature follows the question's category (writing and roleplay
0.7, stem and humanities 0.1, the rest greedy), turn 2 is asked after turn 1 and its answer, and each question
becomes one line of `model_answer/<model-id>.jsonl`:
    {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}
Resumable: questions already answered in that file are not asked again. At the end the file is rewritten
sorted by question id with one line per question (FastChat's reorg_answer_file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from jvila.eval.chat_client import EndpointError
from jvila.eval.mt_bench.data import (
    DEFAULT_TEMPERATURE,
    TEMPERATURE_BY_CATEGORY,
    Question,
    append_record,
    checked_name,
    load_answers,
)
from jvila.eval.mt_bench.work_pool import run_all

log = logging.getLogger("jvila.eval")

# `chat(messages, temperature=..., max_tokens=...) -> str`: a ChatClient's method, or anything that answers alike.
Chat = Callable[..., str]


def answer_path(output_dir: str | Path, model_id: str) -> Path:
    return Path(output_dir) / "model_answer" / f"{checked_name(model_id, 'model id')}.jsonl"


def sampling_temperature(question: Question, force_temperature: float | None = None) -> float:
    """--force-temperature, else the question's own required_temperature, else its category's, else 0.7."""
    if force_temperature is not None:
        return force_temperature
    if question.required_temperature is not None:
        return question.required_temperature
    return TEMPERATURE_BY_CATEGORY.get(question.category, DEFAULT_TEMPERATURE)


def answer_question(chat: Chat, question: Question, *, model_id: str, max_tokens: int, num_choices: int = 1,
                    force_temperature: float | None = None, system: str | None = None) -> dict:
    """One answer record: every turn asked in one conversation that carries the earlier answers."""
    temperature = sampling_temperature(question, force_temperature)
    choices = []
    for index in range(num_choices):
        messages = [{"role": "system", "content": system}] if system else []
        turns = []
        for user_turn in question.turns:
            messages.append({"role": "user", "content": user_turn})
            output = chat(messages, temperature=temperature, max_tokens=max_tokens)
            messages.append({"role": "assistant", "content": output})
            turns.append(output)
        choices.append({"index": index, "turns": turns})
    return {"question_id": question.question_id, "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
            "choices": choices, "tstamp": time.time()}


def generate_answers(chat: Chat, questions: list[Question], *, output_dir: str | Path, model_id: str,
                     max_tokens: int = 1024, num_choices: int = 1, force_temperature: float | None = None,
                     system: str | None = None, parallel: int = 1) -> Path:
    """Answer the questions not yet answered in model_answer/<model_id>.jsonl; returns that file's path."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if num_choices < 1:
        raise ValueError(f"num_choices must be at least 1, got {num_choices}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    if force_temperature is not None and not 0.0 <= force_temperature <= 2.0:
        raise ValueError(f"temperature must be within [0, 2], got {force_temperature}")
    path = answer_path(output_dir, model_id)
    done = load_answers(path) if path.exists() else {}
    todo = [q for q in questions if q.question_id not in done]
    log.info("%s: %d of %d questions already answered, %d to ask", path, len(questions) - len(todo),
             len(questions), len(todo))
    lock = threading.Lock()
    finished = [0]

    def answer_and_write(question: Question) -> None:
        try:
            record = answer_question(chat, question, model_id=model_id, max_tokens=max_tokens,
                                     num_choices=num_choices, force_temperature=force_temperature, system=system)
        except EndpointError as e:
            # Say where it stopped; what was answered stays in the file and is not asked again.
            raise EndpointError(f"answering question {question.question_id}: {e} (finished answers are kept in "
                                f"{path}; run again to resume)") from None
        with lock:
            append_record(path, record)
            finished[0] += 1
            log.info("answered question %d (%d/%d)", question.question_id, finished[0], len(todo))

    run_all(answer_and_write, todo, parallel)
    if todo or path.exists():
        reorganize_answers(path)
    return path


def reorganize_answers(path: str | Path) -> None:
    """Rewrite an answer file sorted by question id, keeping the last line of each question (atomically)."""
    path = Path(path)
    records = load_answers(path)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as f:
        for qid in sorted(records):
            f.write(json.dumps(records[qid], ensure_ascii=False) + "\n")
    os.replace(temporary, path)
