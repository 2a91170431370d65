"""A tiny random-LLM training run for the loop's tests: conversation records, the demo tokenizer and a
recipe, all written into a directory. The model is small enough to compile and step in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

WORDS = ("red", "green", "blue", "circle", "square", "left", "right", "one", "two", "three", "shape", "colour")
TINY_LLM = dict(vocab_size=420, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8)


def write_records(path: Path, count: int, seed: int) -> None:
    """Conversations "repeat: w1 w2 ..." -> "w1 w2 ...": fresh random words, lengths that vary."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(count):
            words = " ".join(rng.choice(WORDS, rng.integers(2, 7)))
            f.write(json.dumps({"id": f"r{i}", "conversations": [
                {"from": "human", "value": f"repeat: {words}"}, {"from": "gpt", "value": words}]}) + "\n")


def write_tiny_run(directory: Path, *, steps: int = 6, every: int = 2, records: int = 64, rows: int = 4,
                   length: int = 64, mesh: dict | None = None, **train) -> Path:
    """The recipe file of a run whose outputs (checkpoints, events, export) go under `directory`/out."""
    directory.mkdir(parents=True, exist_ok=True)
    write_records(directory / "train.jsonl", records, seed=5)
    recipe = {
        "model": {"init": "random", "config": dict(TINY_LLM), "tokenizer": "demo", "seed": 3},
        "data": {"paths": [str(directory / "train.jsonl")], "packing_length": length, "global_batch_size": rows,
                 "seed": 1, "num_workers": 0},
        "optimizer": {"learning_rate": 3.0e-3, "warmup_ratio": 0.2, "clip_norm": 1.0, "weight_decay": 0.01},
        "train": {"steps": steps, "log_every": 1, "attention": "reference", "progress": False, **train},
        "mesh": mesh or {"fsdp": 1},
        "checkpoint": {"every": every, "keep": 2},
        "output_dir": str(directory / "out"),
    }
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_losses(output_dir: Path) -> dict[int, float]:
    """step -> loss from the run's metrics.jsonl (a resumed run appends; later lines win)."""
    losses = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the line a killed run was writing
            continue
        losses[entry["step"]] = entry["loss"]
    return losses
