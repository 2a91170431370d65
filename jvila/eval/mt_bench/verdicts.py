"""Reading a judge's free text: a 1-10 rating, or which of two answers won (FastChat's rules, exactly).

- "[[rating]]": the first `[[number]]`; if there is none, the first `[number]` (FastChat's fallback); else -1.
  The number is taken as written (FastChat does not clamp it to 1-10), an integer or a decimal.
- "[[A]]": "[[A]]" anywhere wins for A, else "[[B]]" for B, else "[[C]]" for a tie, else "error". The checks
  run in that order, so a judgment quoting the format ("[[A]]" if A is better, ...) reads as A.
- "[[rating_a,rating_b]]": two scores; a difference within TIE_DELTA is a tie.
"""

from __future__ import annotations

import re

# Failure markers written into judgment files, as FastChat writes them.
NO_RATING = -1
ERROR = "error"
TIE = "tie"
TIE_DELTA = 0.1

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
_TWO_SCORES = re.compile(r"\[\[(\d+\.?\d*),\s?(\d+\.?\d*)\]\]")
_TWO_SCORES_FALLBACK = re.compile(r"\[(\d+\.?\d*),\s?(\d+\.?\d*)\]")


def _number(text: str) -> int | float:
    # "7" stays an int and "7.5" (or "7.") a float, as FastChat's literal_eval gives them.
    return int(text) if text.isdigit() else float(text)


def parse_rating(judgment: str) -> int | float:
    """The judge's rating, or NO_RATING (-1) when the text holds none."""
    match = _ONE_SCORE.search(judgment) or _ONE_SCORE_FALLBACK.search(judgment)
    return _number(match.group(1)) if match else NO_RATING


def parse_verdict(judgment: str) -> str:
    """"A", "B", TIE or ERROR from a pairwise judgment in the "[[A]]" format."""
    for marker, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", TIE)):
        if marker in judgment:
            return verdict
    return ERROR


def parse_two_scores(judgment: str) -> str:
    """"A", "B", TIE or ERROR from a pairwise judgment in the "[[rating_a,rating_b]]" format."""
    match = _TWO_SCORES.search(judgment) or _TWO_SCORES_FALLBACK.search(judgment)
    if not match:
        return ERROR
    a, b = (_number(s) for s in match.groups())
    if abs(a - b) <= TIE_DELTA:
        return TIE
    return "A" if a > b else "B"


def pairwise_winner(judgment: str, output_format: str) -> str:
    """"A", "B", TIE or ERROR, read by the judge prompt's output format."""
    if output_format == "[[A]]":
        return parse_verdict(judgment)
    if output_format == "[[rating_a,rating_b]]":
        return parse_two_scores(judgment)
    raise ValueError(f"a pairwise judge prompt cannot have output format {output_format!r}")
