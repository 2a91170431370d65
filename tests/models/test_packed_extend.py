"""Packed extend (rows' new tokens back to back) against the padded `extend`, the Pallas ragged
kernel and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention, packed_query_blocks
from jvila.models.kernel_attention import KernelAttention
from jvila.models.kv_cache import KVCache, packed_layout
from jvila.models.llm import LLM

from tiny_hf import random_hf_model, random_tokens, to_jvila

# Power-of-two head_dim and page size, as the Triton-shaped ragged kernel requires; GQA 4:2.
CFG = LLMConfig(vocab_size=89, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16)
PAGE = 4
PAGES_PER_ROW = 12  # 48 tokens per row
# Packed and padded run the same float32 math on differently shaped arrays, so XLA may block the
# matmuls differently: rounding only (~1e-7 relative seen), far below any indexing mistake (order 1).
RTOL = 2e-5
# Per step, tokens each row takes: decodes (1), prompt chunks that straddle pages, idle rows (0).
SCHEDULE = ([7, 0, 13, 3], [1, 9, 1, 0], [1, 1, 1, 1], [0, 6, 1, 17], [2, 1, 0, 1])


# Jitted so each test compiles once per shape instead of dispatching op by op.
extend_packed = jax.jit(functional.extend_packed, static_argnames=("graphdef", "attention"))
extend = jax.jit(functional.extend, static_argnames=("graphdef", "attention"))


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(7)))


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def scattered_cache(rng, rows, spare=5):
    """Pools of random values (stale data a real pool may hold) and shuffled, non-contiguous pages."""
    num_pages = rows * PAGES_PER_ROW + spare
    shape = (num_pages, PAGE, CFG.num_kv_heads, CFG.head_dim)
    pools = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2 * CFG.num_layers)]
    table = rng.permutation(num_pages)[: rows * PAGES_PER_ROW].reshape(rows, PAGES_PER_ROW)
    return KVCache(tuple(pools[::2]), tuple(pools[1::2]), jnp.asarray(table, jnp.int32), jnp.zeros(rows, jnp.int32))


def packed_args(chunks, seqs, done, pad_to):
    tokens = np.concatenate([seqs[b, done[b] : done[b] + n] for b, n in enumerate(chunks)])
    tokens = np.pad(tokens, (0, pad_to - len(tokens)), constant_values=CFG.vocab_size - 1)  # padding: any id
    cu = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(cu)


def padded_args(chunks, seqs, done, width=20):
    block = np.zeros((len(chunks), width), np.int32)
    for b, n in enumerate(chunks):
        block[b, :n] = seqs[b, done[b] : done[b] + n]
    return jnp.asarray(block), jnp.asarray(chunks, jnp.int32)


def run_schedule(graphdef, state, attention_packed, attention_padded, seed, pad_to=48):
    """Runs SCHEDULE both ways on identical caches; yields (rows that took tokens, packed, padded)."""
    rng = np.random.default_rng(seed)
    rows = len(SCHEDULE[0])
    seqs = rng.integers(0, CFG.vocab_size, (rows, 40))
    packed_cache = padded_cache = scattered_cache(rng, rows)
    done = np.zeros(rows, int)
    for chunks in SCHEDULE:
        tokens, cu = packed_args(chunks, seqs, done, pad_to)
        got, packed_cache = extend_packed(graphdef, state, tokens, cu, packed_cache,
                                                     attention=attention_packed)
        block, num_new = padded_args(chunks, seqs, done)
        want, padded_cache = extend(graphdef, state, block, num_new, padded_cache,
                                               attention=attention_padded)
        done += chunks
        np.testing.assert_array_equal(np.asarray(packed_cache.lengths), done)
        yield np.asarray(chunks) > 0, (got, packed_cache), (want, padded_cache)


def test_packed_equals_padded_extend(split_model):
    graphdef, state = split_model
    for took, (got, got_cache), (want, want_cache) in run_schedule(graphdef, state, dense_attention,
                                                                   dense_attention, seed=0):
        assert rel_err(np.asarray(got)[took], np.asarray(want)[took]) < RTOL
        # Same K/V written to the same slots, and padding tokens wrote nothing: whole pools agree
        # (untouched stale slots compare exactly equal).
        for g, w in zip(got_cache.k_pages + got_cache.v_pages, want_cache.k_pages + want_cache.v_pages):
            assert rel_err(g, w) < RTOL


def test_packed_through_the_ragged_kernel(split_model):
    graphdef, state = split_model
    kernels = KernelAttention("pallas_interpret")
    # Kernels use an online softmax (another summation order): float32 rounding only.
    for took, (got, _), (want, _) in run_schedule(graphdef, state, kernels, dense_attention, seed=1, pad_to=40):
        assert rel_err(np.asarray(got)[took], np.asarray(want)[took]) < RTOL


def test_padding_rows_and_tokens_change_nothing(split_model):
    """A real step run inside a larger bucket (extra idle rows, padding tokens) gives the same logits
    and the same pools as the step run alone."""
    graphdef, state = split_model
    rng = np.random.default_rng(2)
    cache = scattered_cache(rng, 3)
    seqs = rng.integers(0, CFG.vocab_size, (3, 20))
    tokens, cu = packed_args([5, 1, 11], seqs, np.zeros(3, int), pad_to=17)
    alone, alone_cache = extend_packed(graphdef, state, tokens, cu, cache, attention=dense_attention)

    big_tokens = jnp.concatenate([tokens, jnp.asarray(rng.integers(0, CFG.vocab_size, 15), jnp.int32)])
    big_cu = jnp.concatenate([cu, jnp.full((2,), cu[-1], jnp.int32)])  # two idle rows
    garbage_rows = jnp.asarray(rng.integers(-5, 10**6, (2, PAGES_PER_ROW)), jnp.int32)
    big_cache = KVCache(cache.k_pages, cache.v_pages, jnp.concatenate([cache.page_table, garbage_rows]),
                        jnp.asarray([0, 0, 0, 9, 0], jnp.int32))
    big, big_cache = extend_packed(graphdef, state, big_tokens, big_cu, big_cache,
                                              attention=dense_attention)
    assert rel_err(big[:3], alone) < RTOL
    for g, w in zip(big_cache.k_pages + big_cache.v_pages, alone_cache.k_pages + alone_cache.v_pages):
        assert rel_err(g, w) < RTOL
    np.testing.assert_array_equal(np.asarray(big_cache.lengths), [5, 1, 11, 9, 0])


def test_media_embeddings_replace_masked_tokens(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(3)
    cache = scattered_cache(rng, 2)
    seqs = rng.integers(0, CFG.vocab_size, (2, 12))
    tokens, cu = packed_args([7, 4], seqs, np.zeros(2, int), pad_to=12)
    media = jnp.asarray(rng.standard_normal((12, CFG.hidden_size)), jnp.float32)
    mask = jnp.asarray(rng.random(12) < 0.5)
    got, _ = extend_packed(graphdef, state, tokens, cu, cache, attention=dense_attention,
                                      input_embeddings=media, embedding_mask=mask)
    # The same rows through the padded extend, with the spliced embeddings given whole.
    model = nnx.merge(graphdef, state)
    spliced = np.asarray(jnp.where(mask[:, None], media, model.embed_tokens(tokens)))
    padded = np.zeros((2, 7, CFG.hidden_size), np.float32)
    padded[0], padded[1, :4] = spliced[:7], spliced[7:11]
    want, _ = extend(graphdef, state, jnp.zeros((2, 7), jnp.int32), jnp.asarray([7, 4], jnp.int32),
                                cache, attention=dense_attention, input_embeddings=jnp.asarray(padded))
    assert rel_err(got, want) < RTOL
    plain, _ = extend_packed(graphdef, state, tokens, cu, cache, attention=dense_attention)
    assert rel_err(got, plain) > 1e-2  # the embeddings were used


def test_layout_and_blocks_match_numpy():
    rng = np.random.default_rng(4)
    q_lens = np.array([0, 3, 1, 9, 0, 1, 5])
    lengths = rng.integers(0, 30, len(q_lens))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = 23  # 19 real + 4 padding
    slot, pos = packed_layout(jnp.asarray(cu), jnp.asarray(lengths, jnp.int32), num_tokens)
    want_slot = np.repeat(np.arange(len(q_lens)), q_lens)
    want_pos = np.concatenate([lengths[b] + np.arange(n) for b, n in enumerate(q_lens)])
    np.testing.assert_array_equal(np.asarray(slot)[:19], want_slot)
    np.testing.assert_array_equal(np.asarray(pos)[:19], want_pos)
    block, row, index, live = packed_query_blocks(jnp.asarray(cu), num_tokens)
    assert block == 4  # next power of two of ceil(23 / 7)
    # Every real token sits in exactly one live block slot, in its own row's block, in order.
    covered = np.asarray(index)[np.asarray(live)]
    np.testing.assert_array_equal(np.sort(covered), np.arange(19))
    for r, idx, lv in zip(np.asarray(row), np.asarray(index), np.asarray(live)):
        if lv.any():
            assert (want_slot[idx[lv]] == r).all() and (np.diff(idx[lv]) == 1).all()


def test_packed_chunks_match_transformers():
    """Two sequences prefilled in uneven packed chunks and decoded: logits equal transformers'
    full forward at each row's last token (llama config with GQA, llama3 rope, biases)."""
    hf = random_hf_model("llama", seed=5)
    graphdef, state = nnx.split(to_jvila(hf))
    cfg = nnx.merge(graphdef, state).config
    seqs = random_tokens(hf.config.vocab_size, (2, 26), seed=6)
    with torch.no_grad():
        full = hf(torch.tensor(seqs, dtype=torch.long)).logits.numpy()
    rng = np.random.default_rng(7)
    num_pages = 16
    shape = (num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(tuple(jnp.zeros(shape) for _ in range(cfg.num_layers)),
                    tuple(jnp.zeros(shape) for _ in range(cfg.num_layers)),
                    jnp.asarray(rng.permutation(num_pages)[:14].reshape(2, 7), jnp.int32), jnp.zeros(2, jnp.int32))
    done = np.zeros(2, int)
    for chunks in ([11, 6], [1, 9], [13, 1], [1, 10]):
        tokens = np.concatenate([seqs[b, done[b] : done[b] + n] for b, n in enumerate(chunks)])
        tokens = np.pad(tokens, (0, 32 - len(tokens)))
        cu = np.asarray([0, chunks[0], sum(chunks)], np.int32)
        got, cache = extend_packed(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(cu), cache,
                          attention=dense_attention)
        done += chunks
        # Same tolerance as the other transformers parity tests: float32, different op orders.
        assert rel_err(got, np.stack([full[b, done[b] - 1] for b in range(2)])) < 1e-4
