"""Arena battle records: one pairwise comparison of two models' answers to the same prompt, and its verdict.

A battles file holds one JSON object a line (the Arena's export, `GET /arena/battles.jsonl`) or, as FastChat's
cleaned battle dumps do, one JSON array of such objects. Fields: `model_a`, `model_b`, `winner` (one of WINNERS),
`tstamp` (seconds since the epoch; online Elo replays battles in this order) and optionally `conv_metadata`, the
answer-style counts that style control needs (`sum_assistant_a_tokens`, `header_count_a`, `list_count_a`,
`bold_count_a` and the same for `_b`; each an int or a dict of ints that are summed). Other fields are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str
    tstamp: float
    conv_metadata: dict | None = field(default=None, compare=False)

    @property
    def is_tie(self) -> bool:
        return self.winner in ("tie", "tie (bothbad)")

    def to_dict(self) -> dict:
        record = {"model_a": self.model_a, "model_b": self.model_b, "winner": self.winner, "tstamp": self.tstamp}
        if self.conv_metadata is not None:
            record["conv_metadata"] = self.conv_metadata
        return record


def parse_battle(record: dict) -> Battle:
    """A Battle from one decoded JSON record; ValueError naming the field when the record is not a valid battle."""
    if not isinstance(record, dict):
        raise ValueError(f"a battle must be a JSON object, got {type(record).__name__}")
    for name in ("model_a", "model_b", "winner", "tstamp"):
        if name not in record:
            raise ValueError(f"missing field {name!r}")
    model_a, model_b, winner, tstamp = (record[name] for name in ("model_a", "model_b", "winner", "tstamp"))
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{name} must be a non-empty string, got {model!r}")
    if model_a == model_b:
        raise ValueError(f"model_a and model_b are the same model {model_a!r}")
    if winner not in WINNERS:
        raise ValueError(f"winner must be one of {', '.join(map(repr, WINNERS))}, got {winner!r}")
    # bool is an int in Python; a timestamp of True is a bug upstream, not a time.
    if isinstance(tstamp, bool) or not isinstance(tstamp, (int, float)) or not math.isfinite(tstamp):
        raise ValueError(f"tstamp must be a finite number of seconds, got {tstamp!r}")
    conv_metadata = record.get("conv_metadata")
    if conv_metadata is not None and not isinstance(conv_metadata, dict):
        raise ValueError(f"conv_metadata must be a JSON object, got {type(conv_metadata).__name__}")
    return Battle(model_a, model_b, winner, float(tstamp), conv_metadata)


def parse_battles_text(text: str, source: str = "battles") -> list[Battle]:
    """Battles from JSONL text (or one JSON array); errors name `source` and the line (or array item)."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON: {e}") from None
        located = [(f"item {i}", record) for i, record in enumerate(records, start=1)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{source} line {number}: not valid JSON: {e.msg}") from None
    battles = []
    for where, record in located:
        try:
            battles.append(parse_battle(record))
        except ValueError as e:
            raise ValueError(f"{source} {where}: {e}") from None
    if not battles:
        raise ValueError(f"{source}: no battles")
    return battles


def read_battles(path: str | Path) -> list[Battle]:
    """Every battle in a JSONL (or JSON array) file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"battles file {str(path)!r} does not exist")
    return parse_battles_text(path.read_text(encoding="utf-8"), source=str(path))


def write_battles(battles: list[Battle], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for battle in battles:
            f.write(json.dumps(battle.to_dict()) + "\n")


def sorted_by_time(battles: list[Battle]) -> list[Battle]:
    """Battles in tstamp order. Equal timestamps keep file order: a stable sort, so that results do not depend on
    the sorting algorithm (FastChat's pandas quicksort leaves their order unspecified)."""
    return sorted(battles, key=lambda battle: battle.tstamp)


def encode(battles: list[Battle]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(models, matchups, outcomes): models in order of first appearance (all model_a, then model_b, as FastChat's
    factorize), matchups an (N, 2) int array of model indices, outcomes 1.0 / 0.5 / 0.0 for model_a's win / tie /
    loss."""
    index: dict[str, int] = {}
    for name in [b.model_a for b in battles] + [b.model_b for b in battles]:
        index.setdefault(name, len(index))
    matchups = np.array([[index[b.model_a], index[b.model_b]] for b in battles], dtype=np.int64).reshape(-1, 2)
    outcomes = np.array([1.0 if b.winner == "model_a" else 0.0 if b.winner == "model_b" else 0.5 for b in battles],
                        dtype=np.float64)
    return list(index), matchups, outcomes
