"""LLM-as-a-judge for MT-bench: single-answer grading and pairwise comparison, as FastChat's gen_judgment.py.

Each question is judged once per turn. Turn 1 shows the judge the first question and answer; turn 2 shows the
whole two-turn conversation and asks about the second answer (the `-multi-turn` prompts). Math, reasoning and
coding questions are judged against a reference answer (the `-math-` prompts). The judge runs at temperature 0.

- single: the judge rates each model's answer 1-10 (single-v1, single-math-v1 and their multi-turn variants).
- pairwise-baseline / pairwise-all: the judge compares two models' answers (pair-v2, pair-math-v1, ...) twice,
  once in each position order, so that a judge's position bias shows up as a disagreement (counted as a tie
  in the tables).

The judge is any OpenAI-compatible chat model; the messages are FastChat's: the prompt's system message, then
the filled-in template as the user message. Judgments already in the file are not asked again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from jvila.eval.mt_bench.answers import Chat, answer_path
from jvila.eval.chat_client import EndpointError
from jvila.eval.mt_bench.data import (
    JudgePrompt,
    MTBenchDataError,
    Question,
    answer_turns,
    append_record,
    load_answers,
)
from jvila.eval.mt_bench.judgment_files import (
    MODES,
    checked_models,
    existing_keys,
    judgment_path,
    pair_key,
    single_key,
)
from jvila.eval.mt_bench.verdicts import pairwise_winner, parse_rating
from jvila.eval.mt_bench.work_pool import run_all

log = logging.getLogger("jvila.eval")

JUDGE_TEMPERATURE = 0.0
DEFAULT_JUDGE_MAX_TOKENS = 2048
DEFAULT_BASELINE = "gpt-3.5-turbo"
# The prompts each mode uses: (plain, reference-guided) × (turn 1, turn 2).
PROMPT_NAMES = {
    "single": {(False, False): "single-v1", (True, False): "single-math-v1",
               (False, True): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn"},
    "pairwise": {(False, False): "pair-v2", (True, False): "pair-math-v1",
                 (False, True): "pair-v2-multi-turn", (True, True): "pair-math-v1-multi-turn"},
}
# Winners as each game saw them (A/B) mapped back to the two models; game 2 shows model_2 as assistant A.
_GAME_1 = {"A": "model_1", "B": "model_2"}
_GAME_2 = {"A": "model_2", "B": "model_1"}


@dataclasses.dataclass(frozen=True)
class Match:
    """One judgment to make: a question's turn, one model's answer (single) or two (pairwise)."""

    question: Question
    models: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    prompt: JudgePrompt
    reference: tuple[str, ...] | None
    multi_turn: bool

    @property
    def turn(self) -> int:
        return 2 if self.multi_turn else 1


def judge_prompts_for(kind: str, prompts: dict[str, JudgePrompt]) -> dict[tuple[bool, bool], JudgePrompt]:
    """{(reference-guided, multi-turn): prompt} for "single" or "pairwise" grading; a missing prompt is an error."""
    chosen = {}
    for key, name in PROMPT_NAMES[kind].items():
        if name not in prompts:
            raise MTBenchDataError(f"the judge prompts have no {name!r} (needed for {kind} grading)")
        if prompts[name].type != kind:
            raise MTBenchDataError(f"judge prompt {name!r} has type {prompts[name].type!r}, expected {kind!r}")
        chosen[key] = prompts[name]
    return chosen


def single_user_prompt(match: Match) -> str:
    question, (answer,) = match.question, match.answers
    if match.multi_turn:
        fields = {"question_1": question.turns[0], "question_2": question.turns[1], "answer_1": answer[0],
                  "answer_2": answer[1]}
    else:
        fields = {"question": question.turns[0], "answer": answer[0]}
    return _fill(match, fields)


def pair_user_prompt(match: Match, answer_a: tuple[str, ...], answer_b: tuple[str, ...]) -> str:
    question = match.question
    if match.multi_turn:
        fields = {"question_1": question.turns[0], "question_2": question.turns[1], "answer_a_1": answer_a[0],
                  "answer_b_1": answer_b[0], "answer_a_2": answer_a[1], "answer_b_2": answer_b[1]}
    else:
        fields = {"question": question.turns[0], "answer_a": answer_a[0], "answer_b": answer_b[0]}
    return _fill(match, fields)


def _fill(match: Match, fields: dict[str, str]) -> str:
    if match.reference is not None:
        fields["ref_answer_1"] = match.reference[0]
        if match.multi_turn:
            fields["ref_answer_2"] = match.reference[1]
    try:
        return match.prompt.prompt_template.format(**fields)
    except (KeyError, IndexError) as e:
        raise MTBenchDataError(f"judge prompt {match.prompt.name!r} asks for {e} which this match does not "
                               f"have") from None


def _ask(chat: Chat, prompt: JudgePrompt, user_prompt: str, max_tokens: int) -> str:
    messages = [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user_prompt}]
    return chat(messages, temperature=JUDGE_TEMPERATURE, max_tokens=max_tokens)


def play_single(chat: Chat, match: Match, judge_model: str, *, max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS) -> dict:
    """One single-answer judgment record (FastChat's format); score -1 when the judge gave no rating."""
    if match.prompt.output_format != "[[rating]]":
        raise MTBenchDataError(f"single grading needs the [[rating]] output format, prompt {match.prompt.name!r} "
                               f"has {match.prompt.output_format!r}")
    user_prompt = single_user_prompt(match)
    judgment = _ask(chat, match.prompt, user_prompt, max_tokens)
    return {"question_id": match.question.question_id, "model": match.models[0],
            "judge": [judge_model, match.prompt.name], "user_prompt": user_prompt, "judgment": judgment,
            "score": parse_rating(judgment), "turn": match.turn, "tstamp": time.time()}


def play_pair(chat: Chat, match: Match, judge_model: str, *, max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS) -> dict:
    """One pairwise judgment record: game 1 with model_1 as A, game 2 with the answers swapped."""
    answer_1, answer_2 = match.answers
    games = []
    for shown, mapping in (((answer_1, answer_2), _GAME_1), ((answer_2, answer_1), _GAME_2)):
        user_prompt = pair_user_prompt(match, *shown)
        judgment = _ask(chat, match.prompt, user_prompt, max_tokens)
        verdict = pairwise_winner(judgment, match.prompt.output_format)
        games.append((mapping.get(verdict, verdict), user_prompt, judgment))
    (g1_winner, g1_prompt, g1_judgment), (g2_winner, g2_prompt, g2_judgment) = games
    return {"question_id": match.question.question_id, "model_1": match.models[0], "model_2": match.models[1],
            "g1_winner": g1_winner, "g2_winner": g2_winner, "judge": [judge_model, match.prompt.name],
            "g1_user_prompt": g1_prompt, "g1_judgment": g1_judgment, "g2_user_prompt": g2_prompt,
            "g2_judgment": g2_judgment, "turn": match.turn, "tstamp": time.time()}


def model_pairs(models: list[str], mode: str, baseline: str | None) -> list[tuple[str, ...]]:
    """Who is judged: each model alone (single), each against the baseline, or every pair (in list order)."""
    if mode == "single":
        return [(m,) for m in models]
    if mode == "pairwise-baseline":
        if not baseline:
            raise ValueError("pairwise-baseline needs a baseline model")
        return [(m, baseline) for m in models if m != baseline]
    return [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]


def make_matches(questions: list[Question], answers: dict[str, dict[int, tuple[str, ...]]],
                 pairs: list[tuple[str, ...]], prompts: dict[tuple[bool, bool], JudgePrompt],
                 references: dict[int, tuple[str, ...]]) -> list[Match]:
    """FastChat's order: plain questions, then reference-guided ones, each for turn 1, then both for turn 2.

    Turn 2 is judged only for questions with exactly two turns. A model without an answer to a question, or a
    reference-guided question without a reference answer, is an error naming both.
    """
    for models in pairs:
        for model in models:
            for q in questions:
                if q.question_id not in answers[model]:
                    raise MTBenchDataError(f"model {model!r} has no answer to question {q.question_id}")
    for q in questions:
        if q.needs_reference and q.question_id not in references:
            raise MTBenchDataError(f"question {q.question_id} ({q.category}) needs a reference answer and has none")
    matches = []
    for multi_turn in (False, True):
        for reference_guided in (False, True):
            prompt = prompts[(reference_guided, multi_turn)]
            for q in questions:
                if q.needs_reference != reference_guided or (multi_turn and len(q.turns) != 2):
                    continue
                reference = references[q.question_id] if reference_guided else None
                if multi_turn and reference is not None and len(reference) < 2:
                    raise MTBenchDataError(f"question {q.question_id}'s reference answer has no second turn")
                for models in pairs:
                    model_answers = tuple(answers[m][q.question_id] for m in models)
                    if multi_turn and any(len(a) < 2 for a in model_answers):
                        raise MTBenchDataError(f"an answer to question {q.question_id} by {models} has no "
                                               "second turn")
                    matches.append(Match(q, models, model_answers, prompt, reference, multi_turn))
    return matches


def load_model_answers(output_dir: str | Path, models: list[str]) -> dict[str, dict[int, tuple[str, ...]]]:
    """{model: {question_id: turns of its first choice}} from model_answer/<model>.jsonl."""
    result = {}
    for model in models:
        path = answer_path(output_dir, model)
        if not path.exists():
            raise MTBenchDataError(f"no answers for model {model!r}: {path} does not exist (generate them first)")
        result[model] = {qid: answer_turns(record, str(path)) for qid, record in load_answers(path).items()}
    return result


def run_judgments(chat: Chat, questions: list[Question], *, output_dir: str | Path, judge_model: str,
                  models: list[str], judge_prompts: dict[str, JudgePrompt], references: dict[int, tuple[str, ...]],
                  mode: str = "single", baseline: str | None = DEFAULT_BASELINE,
                  max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS, parallel: int = 1) -> Path:
    """Judge every match not yet in model_judgment/<judge_model>_<single|pair>.jsonl; returns that file's path."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_tokens < 1 or parallel < 1:
        raise ValueError("max_tokens and parallel must be at least 1")
    if not models:
        raise MTBenchDataError(f"no models to judge: no answer files under {Path(output_dir) / 'model_answer'}")
    checked_models(models)
    pairs = model_pairs(models, mode, baseline)
    if mode != "single" and not pairs:
        raise MTBenchDataError(f"{mode} needs two different models, got {models}"
                               + (f" and baseline {baseline!r}" if mode == "pairwise-baseline" else ""))
    needed = sorted({m for p in pairs for m in p})
    prompts = judge_prompts_for("single" if mode == "single" else "pairwise", judge_prompts)
    matches = make_matches(questions, load_model_answers(output_dir, needed), pairs, prompts, references)
    path = judgment_path(output_dir, judge_model, mode)
    done = existing_keys(path, mode)
    todo = [m for m in matches if _key(m, judge_model) not in done]
    log.info("%s: %d of %d judgments already made, %d to make", path, len(matches) - len(todo), len(matches),
             len(todo))
    play = play_single if mode == "single" else play_pair
    lock = threading.Lock()
    finished = [0]

    def judge_and_write(match: Match) -> None:
        try:
            record = play(chat, match, judge_model, max_tokens=max_tokens)
        except EndpointError as e:
            raise EndpointError(f"judging question {match.question.question_id} turn {match.turn} "
                                f"({' vs '.join(match.models)}): {e} (finished judgments are kept in {path}; run "
                                "again to resume)") from None
        with lock:
            append_record(path, record)
            finished[0] += 1
            outcome = (f"score {record['score']}" if mode == "single"
                       else f"g1 {record['g1_winner']}, g2 {record['g2_winner']}")
            log.info("question %d turn %d %s: %s (%d/%d)", match.question.question_id, match.turn,
                     " vs ".join(match.models), outcome, finished[0], len(todo))

    run_all(judge_and_write, todo, parallel)
    return path


def _key(match: Match, judge_model: str) -> tuple:
    judge = (judge_model, match.prompt.name)
    if len(match.models) == 1:
        return single_key(match.question.question_id, match.models[0], match.turn, judge)
    return pair_key(match.question.question_id, *match.models, match.turn, judge)
