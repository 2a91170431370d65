"""Who fights in the Arena: named contestants over the models the server serves, and how a pair is drawn.

A contestant is a name the leaderboard shows, the served model name that answers (a model or, once
adapters are served, a LoRA adapter), and optionally a system prompt and a sampling temperature, so
that one served model can enter as several contestants. A contestants file is JSON or YAML: a list
of {name, model, system?, temperature?} objects (or {"contestants": [...]}). Without a file, every
served model name is a contestant under its own name.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import yaml

# Temperature when neither the contestant nor the request names one: the Arena samples, as FastChat's
# battles do (its default 0.7).
DEFAULT_TEMPERATURE = 0.7
MAX_NAME_CHARS = 200
_FIELDS = {"name", "model", "system", "temperature"}


@dataclasses.dataclass(frozen=True)
class Contestant:
    name: str
    model: str
    system: str | None = None
    temperature: float = DEFAULT_TEMPERATURE


def contestants_for(served_models: list[str], path: str | Path | None = None) -> list[Contestant]:
    """The contestants of `path` checked against the served model names, or one per served model.

    ValueError (naming the file and the entry) on anything wrong, and when fewer than two remain.
    """
    if path is None:
        contestants = [Contestant(name, name) for name in served_models]
        where = "the served models"
    else:
        contestants = read_contestants(path)
        where = str(path)
        for c in contestants:
            if c.model not in served_models:
                raise ValueError(f"{where}: contestant {c.name!r} names the model {c.model!r}, which this server "
                                 f"does not serve (served: {', '.join(map(repr, served_models))})")
    if len(contestants) < 2:
        raise ValueError(f"the Arena needs at least two contestants; {where} give {len(contestants)} "
                         f"({', '.join(c.name for c in contestants) or 'none'}): pass --arena-contestants FILE")
    return contestants


def read_contestants(path: str | Path) -> list[Contestant]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"contestants file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"contestants file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                         f"{e}") from None
    if isinstance(data, dict) and set(data) == {"contestants"}:
        data = data["contestants"]
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004 - a bad file is bad input: the CLI reports ValueErrors
            f"contestants file {str(path)!r}: expected a list of contestants (or {{contestants: [...]}})")
    contestants = [_contestant(entry, f"{path} entry {i}") for i, entry in enumerate(data, start=1)]
    seen = set()
    for c in contestants:
        if c.name in seen:
            raise ValueError(f"contestants file {str(path)!r}: two contestants are named {c.name!r}")
        seen.add(c.name)
    return contestants


def _contestant(entry, where: str) -> Contestant:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with name and model, got {entry!r}")  # noqa: TRY004
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_FIELDS))})")
    for key in ("name", "model"):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if len(entry["name"]) > MAX_NAME_CHARS:
        raise ValueError(f"{where}: the name is longer than {MAX_NAME_CHARS} characters")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: 'system' must be a string, got {system!r}")
    temperature = entry.get("temperature", DEFAULT_TEMPERATURE)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"{where}: 'temperature' must be a number from 0 to 2, got {temperature!r}")
    return Contestant(entry["name"].strip(), entry["model"], system or None, float(temperature))


def draw_pair(contestants: list[Contestant], rng: random.Random) -> tuple[Contestant, Contestant]:
    """Two different contestants, each pair and each order equally likely (FastChat's draw with equal weights)."""
    first, second = rng.sample(range(len(contestants)), 2)
    return contestants[first], contestants[second]
