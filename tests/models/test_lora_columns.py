"""Adapters side by side along the rank axis (`LoraColumns`): each token gets its own adapter at its own rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_fixtures import random_adapter

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.llm import LLM
from jvila.models.lora import (
    TARGET_MODULES,
    AdapterError,
    LoraColumns,
    ModuleLora,
    column_lora,
    column_stack,
    columns_lora,
    stack_adapters,
)
from serving.adapters.columns import tail_columns

CFG = LLMConfig(vocab_size=89, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=10, qkv_bias=True)
# Odd ranks and a different module set each: no rank or width divides another.
RANKS = (3, 8, 13, 5)
MODULE_SETS = (TARGET_MODULES, ("q_proj", "v_proj"), ("o_proj", "down_proj", "k_proj"), ("gate_proj", "up_proj"))

extend_packed = jax.jit(functional.extend_packed, static_argnames=("graphdef", "attention"))


def random_columns(rng, d_in=40, d_out=30, tokens=23):
    """Adapters of RANKS side by side in 32 columns (3 of padding: owner -1, garbage weights that must not count),
    tokens each naming one (or -1): (x, y, a, b, indices, owner, column scales, [(A, B)], adapter scales)."""
    pairs = [(rng.standard_normal((d_in, r)).astype(np.float32), rng.standard_normal((r, d_out)).astype(np.float32))
             for r in RANKS]
    scales = rng.uniform(0.2, 2.0, len(RANKS)).astype(np.float32)
    columns = 32
    a = rng.standard_normal((columns, d_in)).astype(np.float32)  # Aᵀ: one rank row per column
    b = rng.standard_normal((columns, d_out)).astype(np.float32)
    owner = np.full(columns, -1, np.int32)
    col_scale = rng.uniform(0.2, 2.0, columns).astype(np.float32)
    start = 0
    for i, (pa, pb) in enumerate(pairs):
        r = pa.shape[1]
        a[start: start + r], b[start: start + r], owner[start: start + r] = pa.T, pb, i
        col_scale[start: start + r] = scales[i]
        start += r
    x = rng.standard_normal((tokens, d_in)).astype(np.float32)
    y = rng.standard_normal((tokens, d_out)).astype(np.float32)
    indices = rng.integers(-1, len(RANKS), tokens).astype(np.int32)
    indices[:2] = [-1, 3]  # the base model and the last adapter at least once
    return x, y, a, b, indices, owner, col_scale, pairs, scales


def test_each_token_gets_its_own_adapter_at_its_own_rank():
    x, y, a, b, indices, owner, col_scale, pairs, scales = random_columns(np.random.default_rng())
    got = np.asarray(column_lora(*map(jnp.asarray, (y, x, a, b, indices, owner, col_scale))))
    want = y.astype(np.float64).copy()
    for t, i in enumerate(indices):
        if i >= 0:
            want[t] += scales[i] * (x[t].astype(np.float64) @ pairs[i][0] @ pairs[i][1])
    # float32 sums of at most ~40 products of O(1) terms, against float64: rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[indices < 0], y[indices < 0])  # base rows are untouched, bit for bit


def test_bfloat16_columns_beside_float32_tokens():
    """Adapters held in bfloat16 (serving's `lora_dtype`): x and x @ A rounded to bfloat16, products summed in
    float32."""
    x, y, a, b, indices, owner, col_scale, _, scales = random_columns(np.random.default_rng())
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = column_lora(jnp.asarray(y), jnp.asarray(x), a16, b16, *map(jnp.asarray, (indices, owner, col_scale)))
    assert got.dtype == jnp.float32
    got = np.asarray(got)

    def rounded(v):
        return np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)

    start = np.cumsum([0, *RANKS])
    want, bound = y.astype(np.float64).copy(), np.zeros_like(y, np.float64)
    for t, i in enumerate(indices):
        if i >= 0:
            cols = slice(start[i], start[i + 1])
            xa = rounded(x[t]) @ rounded(a[cols].T) * scales[i]
            want[t] += xa @ rounded(b[cols])
            bound[t] = np.abs(xa) @ np.abs(rounded(b[cols]))
    # The reference takes the same bfloat16 inputs; what it cannot share is the one rounding of x @ A (times its
    # scale) to bfloat16 before B: at most 2^-8 of each term, so of the sum of their magnitudes.
    assert np.all(np.abs(got - want) <= bound * 2.0 ** -8 + 1e-4)
    full = np.asarray(column_lora(*map(jnp.asarray, (y, x, a, b, indices, owner, col_scale))))
    assert np.abs(got - full).max() > 1e-2  # bfloat16 really ran: O(1) terms rounded at 2^-9 in sums of hundreds
    np.testing.assert_array_equal(got[indices < 0], y[indices < 0])


def test_tokens_past_the_tail_start_multiply_only_the_tail_columns():
    """`LoraColumns.tail_columns`: the tokens from `tail_start` on use a gathered subset of the columns (their
    adapters', in any order, with out-of-range padding) and get what all columns give them."""
    rng = np.random.default_rng()
    x, y, a, b, indices, owner, col_scale, pairs, scales = random_columns(rng)
    start = 9
    indices[start:] = rng.choice([-1, 1, 3], len(indices) - start)  # the tail: adapters 1 and 3 and the base
    indices[start: start + 2] = [1, 3]
    ranks = np.cumsum([0, *RANKS])
    # Adapter 3's columns before adapter 1's, then padding: positions in the subset need not follow the set's.
    columns = np.concatenate([np.arange(ranks[3], ranks[4]), np.arange(ranks[1], ranks[2]), [32, 40, 32]])
    weights = LoraColumns(({"q_proj": ModuleLora(jnp.asarray(a), jnp.asarray(b))},), jnp.asarray(owner),
                          jnp.asarray(col_scale), len(RANKS), jnp.asarray(columns, jnp.int32), start)
    got = np.asarray(columns_lora(jnp.asarray(y), jnp.asarray(x), weights.layers[0]["q_proj"], jnp.asarray(indices),
                                  weights))
    want = y.astype(np.float64).copy()
    for t, i in enumerate(indices):
        if i >= 0:
            want[t] += scales[i] * (x[t].astype(np.float64) @ pairs[i][0] @ pairs[i][1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 rounding only, as without a tail
    np.testing.assert_array_equal(got[indices < 0], y[indices < 0])
    # Host side: the tail's columns, bucketed, padded past the set; none when they would be over half of it.
    owner = np.repeat([0, 1, 2, -1], [8, 5, 19, 8])
    tail = tail_columns(owner, np.asarray([1, -1, 0, 1], np.int32))
    np.testing.assert_array_equal(tail, [*range(13), 40, 40, 40])  # 13 columns: bucket 16
    assert tail_columns(owner, np.asarray([2, 1], np.int32)) is None  # 24 columns of 40
    np.testing.assert_array_equal(tail_columns(owner, np.asarray([-1, -1], np.int32)), [40] * 8)  # base tokens alone


def test_columns_serve_a_mixed_batch_as_the_stacked_adapters_do():
    rng = np.random.default_rng()
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    adapters = [random_adapter(CFG, r, mods, rng, alpha=float(r), std=0.6 / np.sqrt(r))
                for r, mods in zip(RANKS, MODULE_SETS)]
    columns = column_stack(adapters, CFG, num_columns=36)
    assert columns.num_columns == 36 and columns.num_adapters == 4 and set(columns.layers[0]) == set(TARGET_MODULES)
    np.testing.assert_array_equal(np.asarray(columns.column_adapters), np.repeat([0, 1, 2, 3, -1], RANKS + (7,)))
    row_adapters = np.asarray([2, -1, 0, 3, 1, 2, 0], np.int32)
    lengths = rng.integers(1, 12, len(row_adapters))
    tokens = np.zeros(64, np.int32)  # one packed step of every row's prompt, padding after
    tokens[: lengths.sum()] = rng.integers(0, CFG.vocab_size, lengths.sum())
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
    per_token = np.full(64, -1, np.int32)
    per_token[: lengths.sum()] = np.repeat(row_adapters, lengths)

    def last_logits(lora):
        cache = contiguous_cache(CFG, len(row_adapters), 16, page_size=8)
        out, _ = extend_packed(graphdef, state, jnp.asarray(tokens), cu, cache, attention=dense_attention, lora=lora,
                               token_adapters=jnp.asarray(per_token))
        return np.asarray(out)

    got = last_logits(columns)
    # The padded-slot layout (every adapter at rank 16), which test_lora_batch checks against merged weights.
    want = last_logits(stack_adapters(adapters, max_rank=16, base_config=CFG))
    # The same float32 products summed in another order: rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    base = last_logits(None)
    assert all(np.abs(got[r] - base[r]).max() > 1e-2 for r in np.flatnonzero(row_adapters >= 0))  # adapters matter
    np.testing.assert_allclose(got[1], base[1], rtol=1e-5, atol=1e-5)  # the base row


def test_column_stack_refuses_too_few_columns_and_adapters_that_do_not_fit():
    rng = np.random.default_rng()
    adapters = [random_adapter(CFG, r, ("q_proj",), rng) for r in (8, 13)]
    with pytest.raises(AdapterError, match="20 columns cannot hold adapters of total rank 21"):
        column_stack(adapters, CFG, num_columns=20)
    wrong = random_adapter(LLMConfig(vocab_size=89, hidden_size=48, intermediate_size=72, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=10), 4, ("q_proj",), rng)
    with pytest.raises(AdapterError, match="do not fit the base model"):
        column_stack([wrong], CFG)
