"""Random battles carrying the style metadata (markdown counts, answer lengths) style control reads."""

import random

from jvila.eval.battles import Battle


def random_styled_battles(seed: int, count: int, *, max_markdown: int) -> list[Battle]:
    rng = random.Random(seed)
    battles = []
    for t in range(count):
        a, b = rng.sample(["x", "y", "z"], 2)
        meta = {f"{key}_{side}": rng.randint(0, max_markdown) for side in "ab"
                for key in ("header_count", "list_count", "bold_count")}
        meta.update(sum_assistant_a_tokens=rng.randint(10, 900), sum_assistant_b_tokens=rng.randint(10, 900))
        battles.append(Battle(a, b, rng.choice(["model_a", "model_b", "tie"]), float(t), meta))
    return battles
