"""Reading ratings and verdicts out of judge text: the formats FastChat's prompts ask for, its fallbacks, and
malformed judge outputs; plus random strings against an independent character-by-character reading."""

import random

import pytest

from jvila.eval.mt_bench.verdicts import (
    ERROR,
    NO_RATING,
    TIE,
    pairwise_winner,
    parse_rating,
    parse_two_scores,
    parse_verdict,
)


@pytest.mark.parametrize("judgment, rating", [
    # The format the single-v1 prompts show: 'Rating: [[5]]'.
    ("The answer is concise and correct. Rating: [[5]]", 5),
    ("Rating: [[10]]", 10),
    ("Rating: [[7.5]]", 7.5),
    ("[[8.]] trailing", 8.0),
    # The first [[n]] counts, even before a later one.
    ("[[3]] then [[9]]", 3),
    # FastChat's fallback: a single bracket when no double one exists.
    ("Rating: [6]", 6),
    ("[2] is cited, final: [[9]]", 9),  # the double-bracket pattern is searched first, anywhere
    # Out of range numbers are kept as written (FastChat does not clamp).
    ("Rating: [[11]]", 11),
    ("[[0]]", 0),
    # Malformed: no bracketed number at all.
    ("Rating: 7/10", NO_RATING),
    ("Rating: [[seven]]", NO_RATING),
    ("Rating: [[-3]]", NO_RATING),
    ("Rating: [[ 5 ]]", NO_RATING),
    ("[[5/10]]", NO_RATING),
    ("", NO_RATING),
    ("Rating: [[", NO_RATING),
])
def test_rating_formats(judgment, rating):
    got = parse_rating(judgment)
    assert got == rating and type(got) is type(rating)


@pytest.mark.parametrize("judgment, verdict", [
    ('After comparing... my final verdict is "[[A]]"', "A"),
    ("[[B]]", "B"),
    ("Both are equally good. [[C]]", TIE),
    # FastChat checks [[A]], then [[B]], then [[C]]: a judgment quoting the whole format reads as A.
    ('Output "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie. Verdict: [[B]]', "A"),
    ("[[C]] no wait [[B]]", "B"),
    # Malformed: single brackets, lower case, spaces, words.
    ("[A]", ERROR),
    ("[[a]]", ERROR),
    ("[[ A ]]", ERROR),
    ("Assistant A is better.", ERROR),
    ("", ERROR),
])
def test_verdict_formats(judgment, verdict):
    assert parse_verdict(judgment) == verdict
    assert pairwise_winner(judgment, "[[A]]") == verdict


@pytest.mark.parametrize("judgment, verdict", [
    ("[[8, 6]]", "A"),
    ("[[6,8]]", "B"),
    ("[[7.5, 7.45]]", TIE),  # within TIE_DELTA = 0.1
    ("[[7, 7.2]]", "B"),
    ("fallback [9, 3]", "A"),
    ("[[9 , 3]]", ERROR),
    ("[[9]]", ERROR),
])
def test_two_score_format(judgment, verdict):
    assert parse_two_scores(judgment) == verdict
    assert pairwise_winner(judgment, "[[rating_a,rating_b]]") == verdict


def test_a_pairwise_prompt_with_a_rating_format_is_refused():
    with pytest.raises(ValueError, match="rating"):
        pairwise_winner("[[A]]", "[[rating]]")


def _read_number(text: str, i: int):
    """Digits, an optional dot, digits from position i: (number text, end) or None. No regular expressions."""
    j = i
    while j < len(text) and text[j].isdigit():
        j += 1
    if j == i:
        return None
    if j < len(text) and text[j] == ".":
        j += 1
        while j < len(text) and text[j].isdigit():
            j += 1
    return text[i:j], j


def _reference_rating(text: str):
    for opening, closing in (("[[", "]]"), ("[", "]")):
        for i in range(len(text)):
            if text.startswith(opening, i):
                found = _read_number(text, i + len(opening))
                if found and text.startswith(closing, found[1]):
                    return float(found[0])
    return -1


def test_random_judge_text_matches_an_independent_reading():
    rng = random.Random(1234)
    pieces = ["[[", "]]", "[", "]", "7", "10", "3.5", ".", "8.", ",", " ", "Rating:", "A", "B", "C", "x", "\n",
              "[[A]]", "[[B]]", "[[C]]", "-"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert float(parse_rating(text)) == _reference_rating(text), text
        expected = next((v for marker, v in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", TIE)) if marker in text),
                        ERROR)
        assert parse_verdict(text) == expected, text
