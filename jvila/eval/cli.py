"""The `jvila eval` command group: one sub-command per benchmark.

Results go to stdout, progress to stderr; bad input is `jvila: error: ...` and exit 2, never a traceback.
Each benchmark registers itself with an `_add_<benchmark>(benchmarks)` function below; the heavy modules are
imported inside the command so that `jvila --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

log = logging.getLogger("jvila")


def _reports_bad_input(run):
    """Bad input (ValueError, a missing file) becomes `jvila: error: ...` and exit 2 instead of a traceback."""

    @functools.wraps(run)
    def wrapped(args) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as e:
            print(f"jvila: error: {e}", file=sys.stderr)
            return 2

    return wrapped


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- arena

# The Arena's anchor, repeated here so that `jvila --help` does not import the rating code (scipy).
ARENA_ANCHOR = ("mixtral-8x7b-instruct-v0.1", 1114.0)


def _anchor(text: str) -> tuple[str, float] | None:
    if text.lower() == "none":
        return None
    model, sep, rating = text.rpartition("=")
    try:
        if not sep or not model:
            raise ValueError
        return model, float(rating)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=RATING or none, got {text!r}") from None


def _arena(args) -> int:
    from jvila.eval.battles import read_battles
    from jvila.eval.leaderboard import format_leaderboard, leaderboard

    battles = read_battles(args.battles)
    log.info("read %d battles from %s", len(battles), args.battles)
    rows = leaderboard(battles, method=args.method, bootstrap_rounds=args.bootstrap, seed=args.seed,
                       style_control=args.style_control, anchor=args.anchor)
    print(format_leaderboard(rows))
    if args.plot:
        from jvila.eval.plots import plot_leaderboard

        plot_leaderboard(rows, args.plot)
        log.info("wrote %s", args.plot)
    return 0


def _add_arena(benchmarks) -> None:
    arena = benchmarks.add_parser(
        "arena", help="ratings, intervals and ranks from pairwise battles (Chatbot Arena)",
        description="Rate models from pairwise battles: Bradley-Terry (default) or online Elo, with bootstrap "
                    "confidence intervals and ranks as Chatbot Arena computes them.")
    arena.add_argument("battles", metavar="BATTLES.jsonl",
                       help='one JSON object a line: model_a, model_b, winner ("model_a", "model_b", "tie", '
                            '"tie (bothbad)"), tstamp')
    arena.add_argument("--method", choices=("bt", "elo"), default="bt",
                       help="bt: Bradley-Terry maximum likelihood (default); elo: online Elo, K=4, in tstamp order")
    arena.add_argument("--bootstrap", type=_non_negative_int, default=100, metavar="N",
                       help="bootstrap rounds for the 95%% intervals (0: no intervals; default %(default)s)")
    arena.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    arena.add_argument("--plot", default=None, metavar="OUT.png", help="also draw the ratings with their intervals")
    arena.add_argument("--style-control", action="store_true",
                       help="Bradley-Terry with answer-style covariates (length, headers, lists, bold) from each "
                            "battle's conv_metadata, as Chatbot Arena's style control")
    arena.add_argument("--anchor", type=_anchor, default=ARENA_ANCHOR, metavar="MODEL=RATING",
                       help="shift Bradley-Terry ratings so that MODEL has RATING when it is rated (default: "
                            f"{ARENA_ANCHOR[0]}={ARENA_ANCHOR[1]:g}, the Arena's; 'none': ratings average 1000)")
    arena.set_defaults(run=_reports_bad_input(_arena))


# ----------------------------------------------------------------------------------------- sorry-bench


def _sorry_bench(args) -> int:
    from jvila.eval.sorry_bench_run import run_sorry_bench

    result = run_sorry_bench(
        data_dir=args.data, output_dir=args.output, base_url=args.base_url, model=args.model,
        api_key=args.api_key, judge_url=args.judge_url, judge_model=args.judge_model,
        judge_api_key=args.judge_api_key, prompt_styles=args.prompt_style, limit=args.limit,
        temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens,
        judge_max_tokens=args.judge_max_tokens, parallel=args.parallel, heatmap=args.heatmap)
    print(result.format_table())
    return 0


def _add_sorry_bench(benchmarks) -> None:
    sorry = benchmarks.add_parser(
        "sorry-bench", help="safety refusal: fulfillment rate per category and mutation (SORRY-Bench)",
        description="Answer SORRY-Bench's unsafe requests through an OpenAI-compatible endpoint, judge each answer "
                    "with SORRY-Bench's judge prompt through an OpenAI-compatible judge, and print the fulfillment "
                    "rate (share of answers that comply; lower is safer) per category, per mutation and "
                    "macro-averaged over categories. Answers and judgments are kept as JSONL under --output and "
                    "reused when the command runs again. Cipher answers are decoded before judging, as the "
                    "benchmark does; answers to the translate-* mutations are judged as written (the benchmark "
                    "translates them back to English first, with a web service this command does not use).")
    sorry.add_argument("--data", required=True, metavar="DIR",
                       help="a local copy of the (gated) SORRY-Bench dataset: question.jsonl and the mutation files")
    sorry.add_argument("--base-url", required=True, metavar="URL",
                       help="OpenAI-compatible endpoint of the model under test, e.g. http://127.0.0.1:8000/v1")
    sorry.add_argument("--model", required=True, metavar="NAME", help="model name sent to --base-url")
    sorry.add_argument("--api-key", default=None, help="key for --base-url (default: none sent)")
    sorry.add_argument("--judge-url", required=True, metavar="URL", help="OpenAI-compatible endpoint of the judge")
    sorry.add_argument("--judge-model", required=True, metavar="NAME", help="judge model name sent to --judge-url")
    sorry.add_argument("--judge-api-key", default=None, help="key for --judge-url (default: none sent)")
    sorry.add_argument("--output", default="sorry_bench_output", metavar="DIR",
                       help="where answers and judgments are written as JSONL (default %(default)s)")
    sorry.add_argument("--prompt-style", action="append", default=None, metavar="STYLE",
                       help="prompt styles to run: base or a mutation name (repeat; default: every style in --data)")
    sorry.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="only the first N questions of each prompt style")
    sorry.add_argument("--temperature", type=float, default=0.7,
                       help="answer sampling temperature (default %(default)s, FastChat's default)")
    sorry.add_argument("--seed", type=int, default=None,
                       help="sample each question with seed + its question_id (reproducible runs)")
    sorry.add_argument("--max-tokens", type=int, default=1024, help="answer length limit (default %(default)s)")
    sorry.add_argument("--judge-max-tokens", type=positive_int, default=1024,
                       help="judge answer length limit; the score is its leading number (default %(default)s)")
    sorry.add_argument("--parallel", type=positive_int, default=8,
                       help="requests in flight at once; servers batch them (default %(default)s)")
    sorry.add_argument("--heatmap", default=None, metavar="OUT.png",
                       help="also draw the fulfillment rates as a category × prompt style heatmap")
    sorry.set_defaults(run=_reports_bad_input(_sorry_bench))


# ---------------------------------------------------------------------------------------------- the group


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` and its benchmark sub-commands on the `jvila` sub-parsers; returns the `eval` parser."""
    ev = subparsers.add_parser("eval", help="evaluate models: Arena ratings, SORRY-Bench, MT-bench",
                               description="Evaluate models. Results on stdout, progress on stderr.")
    benchmarks = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_arena(benchmarks)
    _add_sorry_bench(benchmarks)
    from jvila.eval.mt_bench.cli import add_mt_bench

    add_mt_bench(benchmarks, _reports_bad_input)
    return ev
