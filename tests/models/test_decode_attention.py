"""The dense attention's decode path (one packed token per query block) against a NumPy reference
and against the blocked path it replaces for such steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from jvila.models import attention as attention_module
from jvila.models.attention import CacheInfo, MaskInfo, dense_attention
from jvila.models.kv_cache import packed_layout

PAGE = 4


def reference(q, k_pages, v_pages, table, slots, positions, kv_lengths, num_real):
    """Token by token in float64: token t of row slots[t] sees that row's positions j <= positions[t]."""
    _, q_heads, head_dim = q.shape
    group = q_heads // k_pages.shape[2]
    out = np.zeros(q.shape)
    for t in range(num_real):
        row = slots[t]
        visible = [j for j in range(positions[t] + 1) if j < kv_lengths[row]]
        k = np.stack([k_pages[table[row, j // PAGE], j % PAGE] for j in visible]).astype(np.float64)
        v = np.stack([v_pages[table[row, j // PAGE], j % PAGE] for j in visible]).astype(np.float64)
        for h in range(q_heads):
            scores = k[:, h // group] @ q[t, h].astype(np.float64) / np.sqrt(head_dim)
            probs = np.exp(scores - scores.max())
            out[t, h] = (probs / probs.sum()) @ v[:, h // group]
    return out


@pytest.mark.parametrize("kv_heads,group", [(3, 3), (2, 1)])
def test_decode_path_matches_numpy_and_the_blocked_path(kv_heads, group):
    rng = np.random.default_rng(kv_heads)
    head_dim, num_pages, rows = 8, 43, 8
    # One token per row except a row with none and a row with two, and three padding rows: 8 rows
    # and 8 token slots (the step pads its tokens to the row bucket), so each block holds one token.
    q_lens = np.asarray([1, 0, 2, 1, 1, 0, 0, 0])
    context = np.asarray([6, 3, 13, 0, 9, 0, 0, 0])
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = 8
    assert attention_module.packed_query_blocks(jnp.asarray(cu), num_tokens)[0] == 1
    table = rng.permutation(num_pages)[: rows * 5].reshape(rows, 5).astype(np.int32)
    table[1, 3:] = 999  # entries past a row's pages may be garbage
    k_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim)).astype(np.float32)
    slots, positions = packed_layout(jnp.asarray(cu), jnp.asarray(context, jnp.int32), num_tokens)
    info = CacheInfo(page_table=jnp.asarray(table), kv_lengths=jnp.asarray(context + q_lens, jnp.int32),
                     cu_q_lens=jnp.asarray(cu), token_slots=slots)
    mask = MaskInfo(positions=positions[None])

    def run(fast):
        attention_module.DECODE_FAST_PATH = fast
        try:
            return np.asarray(dense_attention(jnp.asarray(q)[None], jnp.asarray(k_pages), jnp.asarray(v_pages),
                                              mask_info=mask, cache_info=info))[0]
        finally:
            attention_module.DECODE_FAST_PATH = True

    fast, blocked = run(True), run(False)
    want = reference(q, k_pages, v_pages, table, np.asarray(slots), np.asarray(positions), context + q_lens, cu[-1])
    # float32 sums of at most 16 terms against float64: well within 1e-5 absolute for unit-scale values.
    np.testing.assert_allclose(fast, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fast, blocked, atol=1e-5, rtol=1e-5)
    assert np.all(fast[cu[-1]:] == 0.0)  # padding tokens give zeros
