"""`jvila eval mt-bench generate | judge | show`: the three steps of FastChat's llm_judge, on any OpenAI-compatible
endpoints (our `jvila serve` by default), with FastChat's file layout under --output:
    model_answer/<model-id>.jsonl, model_judgment/<judge-model>_single.jsonl and <judge-model>_pair.jsonl
so that FastChat's pre-generated data/mt_bench folder can be shown as it is, and ours read by FastChat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from jvila.eval.cli import positive_int

log = logging.getLogger("jvila")

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # `jvila serve` with its defaults
DEFAULT_MODEL = "smollm2-135m-instruct"  # the name `jvila serve` serves by default
DEFAULT_OUTPUT = "mt_bench_output"
_KEY_HELP = "API key sent as a Bearer token (default: $OPENAI_API_KEY if set, else none)"


def _question_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated question ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no question ids given")
    return ids


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 2], got {value}")
    return value


def _questions(args):
    from jvila.eval.mt_bench.data import load_questions, select_questions

    questions = load_questions(Path(args.data) / "question.jsonl")
    ids = None if args.question_ids is None else [i for group in args.question_ids for i in group]
    return select_questions(questions, question_ids=ids, limit=args.limit)


def _api_key(given: str | None) -> str | None:
    return given if given is not None else os.environ.get("OPENAI_API_KEY")


def _generate(args) -> int:
    from jvila.eval.mt_bench.answers import generate_answers
    from jvila.eval.chat_client import ChatClient

    client = ChatClient(args.base_url, args.model, api_key=_api_key(args.api_key), timeout_s=args.timeout)
    path = generate_answers(client.chat, _questions(args), output_dir=args.output, model_id=args.model_id or args.model,
                            max_tokens=args.max_tokens, num_choices=args.num_choices,
                            force_temperature=args.force_temperature, system=args.system, parallel=args.parallel)
    print(path)
    return 0


def _judge(args) -> int:
    from jvila.eval.chat_client import ChatClient
    from jvila.eval.mt_bench.data import load_judge_prompts, load_reference_answers
    from jvila.eval.mt_bench.judging import run_judgments
    from jvila.eval.mt_bench.judgment_files import answer_models

    questions = _questions(args)
    references = load_reference_answers(args.data, args.reference_model) if any(
        q.needs_reference for q in questions) else {}
    client = ChatClient(args.judge_url, args.judge_model, api_key=_api_key(args.judge_api_key), timeout_s=args.timeout)
    path = run_judgments(client.chat, questions, output_dir=args.output, judge_model=args.judge_model,
                         models=args.models if args.models else answer_models(args.output),
                         judge_prompts=load_judge_prompts(args.judge_prompts), references=references,
                         mode=args.mode, baseline=args.baseline, max_tokens=args.judge_max_tokens,
                         parallel=args.parallel)
    print(path)
    return 0


def _judgment_file(args) -> Path:
    from jvila.eval.mt_bench.judgment_files import judgment_path

    if args.judge_model:
        return judgment_path(args.output, args.judge_model, args.mode)
    kind = "single" if args.mode == "single" else "pair"
    found = sorted((Path(args.output) / "model_judgment").glob(f"*_{kind}.jsonl"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"name the judge with --judge-model: {len(found)} {kind} judgment files under "
                         f"{Path(args.output) / 'model_judgment'} ({names})")
    return found[0]


def _show(args) -> int:
    from jvila.eval.mt_bench.data import load_questions
    from jvila.eval.mt_bench.judgment_files import (
        load_pair_judgments,
        load_single_judgments,
    )
    from jvila.eval.mt_bench.results import (
        format_tables,
        pairwise_tables,
        single_tables,
    )

    path = _judgment_file(args)
    questions = load_questions(Path(args.data) / "question.jsonl")
    log.info("judgments: %s", path)
    if args.mode == "single":
        tables = single_tables(load_single_judgments(path), questions, models=args.models)
    else:
        baseline = args.baseline if args.mode == "pairwise-baseline" else None
        tables = pairwise_tables(load_pair_judgments(path), questions, models=args.models, baseline=baseline)
    print(json.dumps(tables.to_json(), indent=1) if args.json else format_tables(tables))
    return 0


def _common(parser, *, questions: bool = True) -> None:
    from jvila.eval.mt_bench.data import packaged_data_dir

    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help="holds model_answer/ and model_judgment/ (FastChat's data/mt_bench layout; "
                             "default %(default)s)")
    parser.add_argument("--data", default=str(packaged_data_dir()), metavar="DIR",
                        help="question.jsonl and reference_answer/ (default: MT-bench's 80 questions, shipped)")
    if questions:
        parser.add_argument("--question-ids", type=_question_ids, action="append", default=None, metavar="IDS",
                            help="only these questions, e.g. 81,111 (repeatable)")
        parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                            help="only the first N questions (after --question-ids)")
        parser.add_argument("--parallel", type=positive_int, default=1, metavar="N",
                            help="requests in flight at once (default %(default)s)")
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                            help="per request (default %(default)s)")


def _mode(parser) -> None:
    parser.add_argument("--mode", choices=("single", "pairwise-baseline", "pairwise-all"), default="single",
                        help="single: rate each answer 1-10 (MT-bench's score; default); pairwise-baseline: compare "
                             "each model with --baseline; pairwise-all: compare every pair of models")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="model ids to judge or show (default: every answer file / every model judged)")
    parser.add_argument("--baseline", default="gpt-3.5-turbo",
                        help="baseline model id for pairwise-baseline (default %(default)s, as FastChat)")


def add_mt_bench(benchmarks, wrap) -> None:
    """Register `mt-bench` and its steps; `wrap` turns a command's bad input into `jvila: error:` and exit 2."""
    from jvila.eval.mt_bench.data import DEFAULT_REFERENCE_MODEL, packaged_data_dir
    from jvila.eval.mt_bench.judging import DEFAULT_JUDGE_MAX_TOKENS

    mt = benchmarks.add_parser(
        "mt-bench", help="multi-turn chat quality graded by an LLM judge (MT-bench)",
        description="MT-bench as FastChat's llm_judge runs it, in three steps: `generate` asks the model under "
                    "test the 80 two-turn questions (temperature by category), `judge` has a judge model grade "
                    "the answers (1-10 per turn, or pairwise in both position orders; math, reasoning and coding "
                    "against GPT-4's reference answers), `show` prints the tables per model, category and turn. "
                    "Both models are reached through OpenAI-compatible endpoints. Every step resumes: answers "
                    "and judgments already in --output are kept and not asked again.")
    steps = mt.add_subparsers(dest="step", required=True, metavar="STEP")

    gen = steps.add_parser("generate", help="answer the questions through an OpenAI-compatible endpoint",
                           description="Write model_answer/<model-id>.jsonl under --output.")
    gen.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL",
                     help="OpenAI-compatible endpoint of the model under test (default %(default)s: jvila serve)")
    gen.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help="model name sent (default %(default)s)")
    gen.add_argument("--model-id", default=None, metavar="ID",
                     help="name of the answers (the answer file's name; default: --model)")
    gen.add_argument("--api-key", default=None, help=_KEY_HELP)
    gen.add_argument("--max-tokens", type=positive_int, default=1024, help="per turn (default %(default)s)")
    gen.add_argument("--num-choices", type=positive_int, default=1, help="answers per question (the judge reads "
                                                                          "the first; default %(default)s)")
    gen.add_argument("--force-temperature", type=_temperature, default=None, metavar="T",
                     help="one temperature for every question instead of FastChat's per-category ones")
    gen.add_argument("--system", default=None, help="a system message before the first turn (default: none)")
    _common(gen)
    gen.set_defaults(run=wrap(_generate))

    judge = steps.add_parser("judge", help="grade the answers with a judge model",
                             description="Write model_judgment/<judge-model>_single.jsonl (or _pair.jsonl) under "
                                         "--output. The judge decodes greedily.")
    judge.add_argument("--judge-url", default=DEFAULT_BASE_URL, metavar="URL",
                       help="OpenAI-compatible endpoint of the judge (default %(default)s)")
    judge.add_argument("--judge-model", required=True, metavar="NAME",
                       help="judge model name sent to --judge-url; also names the judgment file")
    judge.add_argument("--judge-api-key", default=None, help=_KEY_HELP)
    judge.add_argument("--judge-max-tokens", type=positive_int, default=DEFAULT_JUDGE_MAX_TOKENS,
                       help="judgment length limit (default %(default)s)")
    judge.add_argument("--judge-prompts", default=str(packaged_data_dir() / "judge_prompts.jsonl"), metavar="FILE",
                       help="FastChat's judge_prompts.jsonl (default: shipped)")
    judge.add_argument("--reference-model", default=DEFAULT_REFERENCE_MODEL, metavar="NAME",
                       help="reference answers: reference_answer/NAME.jsonl under --data (default %(default)s)")
    _mode(judge)
    _common(judge)
    judge.set_defaults(run=wrap(_judge))

    show = steps.add_parser("show", help="print the tables per model, category and turn",
                            description="Read the judgment file and print FastChat's tables (stdout).")
    show.add_argument("--judge-model", default=None, metavar="NAME",
                      help="whose judgments (default: the only judgment file of the mode)")
    show.add_argument("--json", action="store_true", help="print the tables as JSON")
    _mode(show)
    _common(show, questions=False)
    show.set_defaults(run=wrap(_show))
