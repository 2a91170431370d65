"""The RoPE-theta context-extension switch and the needle-in-a-haystack harness (with an oracle
that retrieves, a predictor that cannot, and a model)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila.config import LLMConfig, RopeConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.llm import LLM
from jvila.models.long_context import (
    LONGVILA_THETAS,
    extend_context,
    insert_needle_frame,
    make_needle_example,
    niah_grid,
    ntk_theta,
)
from jvila.models.rope import inverse_frequencies

CFG = LLMConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=64)


def test_theta_switch():
    longer = extend_context(CFG, 131_072)
    assert longer.rope.theta == LONGVILA_THETAS[131_072] and longer.max_position_embeddings == 131_072
    ntk = extend_context(CFG, 256)
    assert ntk.rope.theta == pytest.approx(10000.0 * 4 ** (8 / 6))
    assert ntk_theta(1e6, 1000, 1000, 128) == 1e6
    # A larger base slows every rotation but the first (frequency 1).
    slow, fast = inverse_frequencies(ntk.rope, 8), inverse_frequencies(CFG.rope, 8)
    assert slow[0] == fast[0] and np.all(slow[1:] < fast[1:])
    assert extend_context(CFG, 100, theta=5e5).rope.theta == 5e5
    with pytest.raises(ValueError, match="does not extend"):
        extend_context(CFG, 32)
    with pytest.raises(ValueError, match="llama3"):
        extend_context(dataclasses.replace(CFG, rope=RopeConfig(kind="llama3", factor=8.0)), 1024)


def induction_oracle(tokens):
    """Predicts, after a bigram seen before, the token that followed it then (one-hot logits)."""
    seq = np.asarray(tokens)[0]
    logits = np.zeros((1, len(seq), CFG.vocab_size), np.float32)
    for i in range(1, len(seq)):
        for j in range(i - 1, 0, -1):
            if seq[j] == seq[i] and seq[j - 1] == seq[i - 1]:
                logits[0, i, seq[j + 1]] = 1.0
                break
    return logits


def test_needle_placement_and_scoring():
    ex = make_needle_example(100, 0.5, vocab_size=CFG.vocab_size, seed=3)
    needle = ex.tokens[ex.needle_position:ex.needle_position + 8]
    assert np.array_equal(needle[4:], ex.answer) and np.array_equal(ex.tokens[-8:], needle)
    assert np.all(np.delete(ex.tokens, np.r_[ex.needle_position:ex.needle_position + 8, 92:100]) < 256)
    grid = niah_grid(induction_oracle, [40, 100], [0.0, 0.5, 1.0], vocab_size=CFG.vocab_size, seeds=(0, 1))
    assert set(grid.values()) == {1.0}
    blind = niah_grid(lambda t: np.roll(induction_oracle(t), 1, axis=-1), [100], [0.5], vocab_size=CFG.vocab_size)
    assert blind[(100, 0.5)] == 0.0
    with pytest.raises(ValueError, match="cannot hold"):
        make_needle_example(10, 0.5, vocab_size=CFG.vocab_size)
    frames, index = insert_needle_frame(jnp.zeros((5, 2, 2, 3)), jnp.ones((2, 2, 3)), 0.4)
    assert index == 2 and frames.shape == (6, 2, 2, 3) and float(frames[2].min()) == 1.0


def test_harness_runs_a_model():
    # A random model cannot find the needle; what is checked is that the grid scores the model's
    # own argmax at the answer positions (sequence-parallel logits equal these: test_sharded_step).
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(1)))
    fn = jax.jit(lambda t: functional.logits(graphdef, state, t, attention=dense_attention))
    grid = niah_grid(fn, [64], [0.25], vocab_size=CFG.vocab_size, seeds=(5,))
    ex = make_needle_example(64, 0.25, vocab_size=CFG.vocab_size, seed=5)
    predicted = np.argmax(np.asarray(fn(jnp.asarray(ex.tokens)[None]))[0, ex.answer_positions], axis=-1)
    assert grid[(64, 0.25)] == float(np.mean(predicted == ex.answer))
