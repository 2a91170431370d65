"""A LoRA recipe through the loop: only the adapter trains (bf16 compute, grad accumulation, dropout on)
and the export is a PEFT adapter directory that loads back onto the base model's config."""

import jax
import numpy as np

from jvila.checkpoints.peft_adapter import load_peft
from jvila.config import LLMConfig
from jvila.train.loop import train
from jvila.train.recipe import load_recipe
from tiny_recipe import TINY_LLM, write_tiny_run


def test_lora_recipe_exports_a_peft_adapter(tmp_path):
    recipe = load_recipe(write_tiny_run(tmp_path, steps=3, every=100),
                         ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "lora.targets=[q_proj, down_proj]",
                          "train.compute_dtype=bfloat16", "train.grad_accum=2"])
    summary = train(recipe, devices=jax.devices()[:1])
    assert sorted(summary.losses) == [1, 2, 3] and all(np.isfinite(list(summary.losses.values())))
    adapter = load_peft(summary.export_dir, LLMConfig(**TINY_LLM))
    assert adapter.config.rank == 4 and set(adapter.config.target_modules) == {"q_proj", "down_proj"}
    a, b = adapter.weights[0]["q_proj"]
    assert a.shape == (32, 4) and b.shape == (4, 32)
    # B starts at zero (PEFT's init): after three updates it has moved, so the adapter was trained.
    assert np.abs(b).max() > 0
