"""A voted battle as one record of the battles file `jvila eval arena` reads (FastChat's cleaned-battle fields).

Besides model_a, model_b, winner and tstamp (the vote's time), a record keeps both one-turn
conversations in OpenAI's message format and `conv_metadata`: the answer-style counts that style
control regresses on, counted as FastChat's monitor counts them (markdown headers, list items and
bold spans outside fenced code blocks, and the answer's token count).
"""

from __future__ import annotations

import re

from serving.arena.store import StoredBattle

_CODE_BLOCK = re.compile(r"```[^`]*```")
_HEADERS = {f"h{level}": re.compile(rf"^#{{{level}}}\s", re.MULTILINE) for level in range(1, 7)}
_ORDERED_ITEM = re.compile(r"^\s*\d+\.\s", re.MULTILINE)
_UNORDERED_ITEM = re.compile(r"^\s*[-*+]\s", re.MULTILINE)
_BOLD_STARS = re.compile(r"\*\*[^*\n]+\*\*")
_BOLD_UNDERSCORES = re.compile(r"__[^_\n]+__")


def battle_record(battle: StoredBattle) -> dict:
    if battle.winner is None or not battle.answered:
        raise ValueError(f"battle {battle.id!r} has no vote or no complete answers: it is not a battle record yet")
    metadata = {}
    for side, answer, tokens in (("a", battle.answer_a, battle.tokens_a), ("b", battle.answer_b, battle.tokens_b)):
        metadata[f"sum_assistant_{side}_tokens"] = int(tokens or 0)
        metadata.update(markdown_counts(answer, side))
    return {
        "question_id": battle.id,
        "model_a": battle.contestant_a,
        "model_b": battle.contestant_b,
        "winner": battle.winner,
        "tstamp": battle.vote_tstamp,
        "turn": 1,
        "anony": True,
        "conversation_a": _conversation(battle.prompt, battle.answer_a),
        "conversation_b": _conversation(battle.prompt, battle.answer_b),
        "conv_metadata": metadata,
    }


def markdown_counts(answer: str, side: str) -> dict[str, dict[str, int]]:
    """{header_count_<side>: {h1..h6}, list_count_<side>: {ordered, unordered}, bold_count_<side>: {**, __}}."""
    # Code is not style: a '#' comment or a '-' line inside a fenced block is not a header or a list item.
    text = _CODE_BLOCK.sub("", answer)
    return {
        f"header_count_{side}": {name: len(pattern.findall(text)) for name, pattern in _HEADERS.items()},
        f"list_count_{side}": {"ordered": len(_ORDERED_ITEM.findall(text)),
                               "unordered": len(_UNORDERED_ITEM.findall(text))},
        f"bold_count_{side}": {"**": len(_BOLD_STARS.findall(text)), "__": len(_BOLD_UNDERSCORES.findall(text))},
    }


def _conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
