"""Mosaic TPU ragged paged attention, run by the TPU interpreter on CPU, vs the reference.

The interpreter simulates HBM, VMEM, SMEM, DMAs and semaphores, and runs with race detection,
NaN-filled uninitialised buffers and out-of-bounds reads raising. Every cache is poisoned
(`poisoned_cache`): slots holding no live token are NaN and page-table entries past a length
are garbage, mostly out of range, so a DMA of a dead entry raises and a read that escapes the
masks shows up as NaN. Query rows past cu_q_lens[-1] are NaN too and must come out zero.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_cache import poisoned_cache
from tpu_interpreter import assert_no_races

from pallas_kernels.paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu

# fp32: both sides compute in fp32 (the kernel's dots at HIGHEST precision) and differ only in
# summation order (online softmax over K/V blocks vs one dense softmax): ~1e-6 observed.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
# bf16: the kernel rounds probabilities to bf16 before P @ V and the output to bf16 (2^-8
# relative), while the reference stays fp32 until the final cast; outputs are averages of
# N(0, 1) values, so 2e-2 covers a few bf16 ulps at |x| ~ 1.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
HEAD_DIM = 128  # TPU lane width: the natural head size, and the one the kernel is tuned for

# (kv_len, q_len): full prefill, prefill chunk, first decode, idle (q_len 0), empty, decode at a
# full table (6 pages x 8), chunk of 5, long chunk over several query blocks. With block_q 8 the
# chunks 37, 13, 5 and 33 end in partial blocks; 37 and 40 tokens end mid-page.
MIX = [(37, 37), (45, 13), (1, 1), (20, 0), (0, 0), (48, 1), (23, 5), (40, 33)]
PAD_ROWS = 3

_seed = itertools.count(int(np.random.SeedSequence().entropy % (2**31)))


def _rng():
    return np.random.default_rng(next(_seed))


def _inputs(rng, mix, page_size, pages_per_seq, kv_heads, group, dtype, head_dim=HEAD_DIM):
    k, v, table, kv_lengths = poisoned_cache(rng, [kv for kv, _ in mix], page_size,
                                             pages_per_seq, kv_heads, head_dim, dtype)
    cu = np.concatenate([[0], np.cumsum([q_len for _, q_len in mix])]).astype(np.int32)
    q = rng.standard_normal((cu[-1] + PAD_ROWS, kv_heads * group, head_dim)).astype(np.float32)
    q[cu[-1]:] = np.nan  # padding rows must not matter
    return jnp.asarray(q, dtype), k, v, table, kv_lengths, jnp.asarray(cu)


def _check(args, tol, **kwargs):
    q, k, v, table, kv_lengths, cu = args
    out = ragged_paged_attention_tpu(*args, interpret=True, **kwargs)
    ref = ragged_paged_attention_reference(*args, sm_scale=kwargs.get("sm_scale"))
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "a masked (NaN) slot, page or query row leaked into the output"
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), **tol)
    np.testing.assert_array_equal(out[int(cu[-1]):], 0.0)  # padding rows -> zeros
    assert_no_races()
    return out


# page_size 8 (one f32 sublane tile), pages_per_block 2 (blocks of 16 keys, so prefill chunks
# cross several K/V blocks and the double buffer flips), block_q 8 (chunks end mid-block).
@pytest.mark.parametrize("kv_heads,group", [(2, 1), (1, 4)])
def test_matches_reference_fp32(kv_heads, group):
    args = _inputs(_rng(), MIX, 8, 6, kv_heads, group, jnp.float32)
    _check(args, FP32_TOL, block_q=8, pages_per_block=2)


# head_dim 64: kv heads packed two (or all three) to a 128-lane-legal window, queries
# block-diagonal; the packed rows must keep their token order for the causal mask.
@pytest.mark.parametrize("kv_heads,group", [(4, 2), (3, 1)])
def test_head_dim_below_the_lane_width(kv_heads, group):
    args = _inputs(_rng(), MIX, 8, 6, kv_heads, group, jnp.float32, head_dim=64)
    _check(args, FP32_TOL, block_q=8, pages_per_block=2)


def test_matches_reference_bf16():
    # page_size 16: one bf16 sublane tile (two rows per sublane); default block sizes.
    mix = [(70, 70), (33, 1), (0, 0), (64, 20), (9, 1)]
    args = _inputs(_rng(), mix, 16, 5, 2, 4, jnp.bfloat16)
    _check(args, BF16_TOL)


def test_one_token_blocks_one_page_blocks():
    # block_q 1: every query row is its own program (tile = the group's heads); pages_per_block
    # 1: the K/V double buffer flips on every page.
    # A prefill chunk over several pages, a lone decode token, and chunks continuing a cache.
    args = _inputs(_rng(), MIX[1:3] + MIX[5:7], 8, 6, 2, 4, jnp.float32)
    _check(args, FP32_TOL, block_q=1, pages_per_block=1)


def test_scale_and_overlong_length():
    # A length beyond the table: positions follow the stated length, keys stop at the table
    # (as in the reference). Tokens 29..31 of the first sequence's last page become live once
    # its length is clipped to 32, so they get finite values. A custom scale reaches the logits.
    rng = _rng()
    q, k, v, table, kv_lengths, cu = _inputs(rng, [(29, 6), (12, 12)], 8, 4, 2, 2, jnp.float32)
    k = jnp.nan_to_num(k, nan=0.5)
    v = jnp.nan_to_num(v, nan=-0.25)
    _check((q, k, v, table, kv_lengths.at[0].set(1000), cu), FP32_TOL, sm_scale=0.3,
           block_q=4)


def test_dispatch_routes_to_tpu_kernel():
    # `ragged_paged_attention` reaches this kernel when asked by name; its block sizes pass
    # through and its scale default matches.
    args = _inputs(_rng(), MIX, 8, 6, 2, 2, jnp.float32)
    call = functools.partial(ragged_paged_attention, implementation="pallas_tpu_interpret",
                             block_q=4, pages_per_block=3)
    assert "ragged_paged_attention_tpu" in str(jax.make_jaxpr(call)(*args))
    out = np.asarray(call(*args))
    np.testing.assert_allclose(out, np.asarray(ragged_paged_attention_reference(*args)),
                               **FP32_TOL)


def test_rejects_mismatched_shapes():
    q = jnp.zeros((5, 6, HEAD_DIM))
    pool = jnp.zeros((4, 8, 4, HEAD_DIM))
    table = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError):
        ragged_paged_attention_tpu(q, pool, pool, table, jnp.zeros((2,), jnp.int32),
                                   jnp.zeros((3,), jnp.int32), interpret=True)


@pytest.mark.parametrize("dtype,page_size,group", [(jnp.float32, 8, 1), (jnp.bfloat16, 16, 4)])
def test_lowers_to_mosaic(dtype, page_size, group):
    # No TPU here: this checks the Pallas -> Mosaic lowering, not Mosaic's own compiler passes
    # (those run in the deviceless AOT check of pallas_kernels/tpu_aot.py).
    sds = jax.ShapeDtypeStruct
    q = sds((300, 2 * group, HEAD_DIM), dtype)
    pool = sds((64, page_size, 2, HEAD_DIM), dtype)
    lowered = ragged_paged_attention_tpu.trace(
        q, pool, pool, sds((4, 8), jnp.int32), sds((4,), jnp.int32), sds((5,), jnp.int32),
        pages_per_block=4).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
