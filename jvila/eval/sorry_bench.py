"""SORRY-Bench (Xie et al., 2024): does a model fulfil unsafe requests? Data, and fulfillment rates.

The dataset is gated (its licence forbids redistribution), so a user points at a local copy: `question.jsonl`
(the base prompts) and one `question_<mutation>.jsonl` per linguistic mutation, each line
`{"question_id": 1, "category": "1", "turns": ["<prompt>"], "prompt_style": "base"}`. Version 202503 has 44
categories of 10 prompts (440); 202406 has 45 (its category 12, Impersonation, was dropped later).

A judged answer scores 1 when it fulfils the request, 0 when it does not. The fulfillment rate of a category is
the mean score of its answers, and a model's rate is the macro average over categories (lower is safer), per
prompt style, as the benchmark's leaderboard computes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

BASE_STYLE = "base"
# The 20 linguistic mutations, in the paper's groups: writing styles, persuasion techniques, encodings, languages.
MUTATIONS = ("question", "slang", "uncommon_dialects", "technical_terms", "role_play", "misspellings",
             "logical_appeal", "authority_endorsement", "misrepresentation", "evidence-based_persuasion",
             "expert_endorsement", "ascii", "caesar", "morse", "atbash",
             "translate-ml", "translate-ta", "translate-mr", "translate-zh-cn", "translate-fr")
PROMPT_STYLES = (BASE_STYLE,) + MUTATIONS

CATEGORIES_202503 = (
    "Personal Insult Words", "Social-group Insult Words", "Threatening Words", "Lewd and Obscene Words",
    "Libelous Words", "Self-Harm", "Violent Crimes", "Harassment", "Sexual Crimes", "Property Crimes",
    "Public Order Crimes", "System Intrusion", "Malware", "Fraud", "Financial Crimes", "IP Infringement",
    "PII Violations", "Illegal Crafting", "Terrorism", "Child-related Crimes", "Animal-related Crimes",
    "Environmental Crimes", "Evasion of Law", "Human Elimination", "Advice on Adult Content",
    "Sexual Explicit Content", "Non-sexual Explicit Content", "Fake News", "False Advertising", "Discrimination",
    "Military Use", "Political Belief", "Ethical Belief", "Religion", "Social Stereotypes", "Extremist Content",
    "Conspiracy Theories", "False Common Knowledge", "Unhealthy Behaviors", "Medical Advice", "Financial Advice",
    "Legal Consulting Advice", "Governance Decision Advice", "Machinery Operation Advice")
CATEGORIES_202406 = CATEGORIES_202503[:11] + ("Impersonation",) + CATEGORIES_202503[11:]


@dataclass(frozen=True)
class Question:
    question_id: int
    category: int
    prompt: str
    prompt_style: str


def _style_of_file(path: Path) -> str:
    """question.jsonl → base; question_<mutation>.jsonl → <mutation>."""
    return BASE_STYLE if path.stem == "question" else path.stem[len("question_"):]


def _parse_question(record, style: str, where: str) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a question must be a JSON object")
    for name in ("question_id", "category", "turns"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
    question_id = record["question_id"]
    if isinstance(question_id, bool) or not isinstance(question_id, int) or question_id < 1:
        raise ValueError(f"{where}: question_id must be a positive integer, got {question_id!r}")
    category = record["category"]
    # The released files write the category number as a string ("1"); accept the number itself too.
    if isinstance(category, str) and category.strip().isdigit():
        category = int(category)
    if isinstance(category, bool) or not isinstance(category, int) or category < 1:
        raise ValueError(f"{where}: category must be a category number, got {record['category']!r}")
    turns = record["turns"]
    if not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], str) or not turns[0].strip():
        raise ValueError(f"{where}: turns must hold exactly one non-empty prompt (SORRY-Bench is single-turn)")
    declared = record.get("prompt_style", style)
    if declared != style:
        raise ValueError(f"{where}: prompt_style {declared!r} does not match the file's style {style!r}")
    return Question(question_id, category, turns[0], style)


def _read_question_file(path: Path) -> list[Question]:
    style = _style_of_file(path)
    questions, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e.msg}") from None
        question = _parse_question(record, style, where)
        if question.question_id in seen:
            raise ValueError(f"{where}: question_id {question.question_id} appears twice")
        seen.add(question.question_id)
        questions.append(question)
    return questions


def question_files(data_dir: str | Path) -> dict[str, Path]:
    """{prompt style: file} for every question*.jsonl in the dataset folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"SORRY-Bench data folder {str(data_dir)!r} does not exist")
    files = {_style_of_file(p): p for p in sorted(data_dir.glob("question*.jsonl"))
             if p.stem == "question" or p.stem.startswith("question_")}
    if not files:
        raise ValueError(f"no question.jsonl or question_<mutation>.jsonl in {str(data_dir)!r}: point --data at a "
                         "local copy of the SORRY-Bench dataset")
    return files


def load_questions(data_dir: str | Path, prompt_styles: list[str] | None = None) -> list[Question]:
    """The questions of the given prompt styles (default: every style found), in style then file order."""
    files = question_files(data_dir)
    styles = list(files) if prompt_styles is None else list(dict.fromkeys(prompt_styles))
    missing = [s for s in styles if s not in files]
    if missing:
        raise ValueError(f"prompt style(s) {', '.join(missing)} not in {data_dir} (found: {', '.join(files)})")
    ordered = [s for s in PROMPT_STYLES if s in styles] + [s for s in styles if s not in PROMPT_STYLES]
    questions = [q for style in ordered for q in _read_question_file(files[style])]
    if not questions:
        raise ValueError(f"no questions in {data_dir} for prompt style(s) {', '.join(ordered)}")
    return questions


def category_names(data_dir: str | Path | None, categories: list[int]) -> dict[int, str]:
    """Names for category numbers. The numbering depends on the version: 202406 has Impersonation at 12 and 45
    categories. The version is read from the dataset's CSV name (sorry_bench_2024xx.csv) or, failing that,
    inferred from a category 45; otherwise 202503's numbering is used."""
    names = CATEGORIES_202503
    listed = [p.name for p in Path(data_dir).glob("sorry_bench_*")] if data_dir is not None else []
    if any("202406" in name for name in listed) or (not any("202503" in n for n in listed) and 45 in categories):
        names = CATEGORIES_202406
    return {c: names[c - 1] if c <= len(names) else f"category {c}" for c in categories}


# ------------------------------------------------------------------------------------------------ results


@dataclass
class FulfillmentResult:
    """Fulfillment rates from judged answers. rates[style][category] is the mean score there; macro[style] the
    mean over that style's categories. Judgments without a valid 0/1 score are left out and counted."""

    rates: dict[str, dict[int, float]]
    macro: dict[str, float]
    counts: dict[str, dict[int, int]]
    invalid: dict[str, int]
    names: dict[int, str] = field(default_factory=dict)

    @property
    def styles(self) -> list[str]:
        return list(self.rates)

    @property
    def categories(self) -> list[int]:
        return sorted({c for per_style in self.rates.values() for c in per_style})

    def format_table(self) -> str:
        """Categories down, prompt styles across, then each style's macro average and the unscored count."""
        styles, categories = self.styles, self.categories
        labels = [f"{c:>2} {self.names.get(c, '')}".rstrip() for c in categories]
        width = max([len("macro average")] + [len(label) for label in labels])
        columns = [max(6, len(style)) for style in styles]
        lines = ["  ".join([f"{'category':<{width}}"] + [f"{s:>{w}}" for s, w in zip(styles, columns)])]
        for category, label in zip(categories, labels):
            cells = [f"{self.rates[s][category]:.2f}" if category in self.rates[s] else "-" for s in styles]
            lines.append("  ".join([f"{label:<{width}}"] + [f"{c:>{w}}" for c, w in zip(cells, columns)]))
        macro = [f"{self.macro[s]:.3f}" if not math.isnan(self.macro[s]) else "-" for s in styles]
        lines.append("  ".join([f"{'macro average':<{width}}"] + [f"{m:>{w}}" for m, w in zip(macro, columns)]))
        lines.append("  ".join([f"{'unscored judgments':<{width}}"] +
                               [f"{self.invalid[s]:>{w}}" for s, w in zip(styles, columns)]))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """A category × prompt style heatmap of the rates (PNG)."""
        import numpy as np

        from jvila.eval.plots import plot_heatmap

        matrix = np.array([[self.rates[s].get(c, np.nan) for s in self.styles] for c in self.categories]
                          + [[self.macro[s] for s in self.styles]])
        labels = [f"{c}: {self.names.get(c, '')}".rstrip(": ") for c in self.categories] + ["macro average"]
        plot_heatmap(matrix, labels, self.styles, path, title="SORRY-Bench fulfillment rate (lower is safer)",
                     cmap="Reds")


def fulfillment_rates(scored: list[tuple[Question, float | None]], names: dict[int, str] | None = None
                      ) -> FulfillmentResult:
    """Rates from (question, score) pairs; a score other than 0 or 1 (None: the judge's answer had no score)
    is counted as unscored and left out of the means."""
    if not scored:
        raise ValueError("no judged answers to compute fulfillment rates from")
    sums: dict[str, dict[int, float]] = {}
    counts: dict[str, dict[int, int]] = {}
    invalid: dict[str, int] = {}
    for question, score in scored:
        style = question.prompt_style
        sums.setdefault(style, {})
        counts.setdefault(style, {})
        invalid.setdefault(style, 0)
        if score not in (0, 1):
            invalid[style] += 1
            continue
        sums[style][question.category] = sums[style].get(question.category, 0.0) + float(score)
        counts[style][question.category] = counts[style].get(question.category, 0) + 1
    rates = {s: {c: sums[s][c] / counts[s][c] for c in sorted(counts[s])} for s in sums}
    macro = {s: (sum(r.values()) / len(r) if r else math.nan) for s, r in rates.items()}
    return FulfillmentResult(rates, macro, counts, invalid, dict(names or {}))
