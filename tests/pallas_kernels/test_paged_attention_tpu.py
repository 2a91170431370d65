"""Mosaic TPU paged decode attention, run by the TPU interpreter on CPU, vs the reference.

The interpreter simulates HBM, VMEM, SMEM, DMAs and semaphores, and is run with race detection,
NaN-filled uninitialised buffers and out-of-bounds reads raising. Every cache is poisoned: slots
holding no live token are NaN and page-table entries past a length are garbage, mostly out of
range (-7, 10**6, random), so a DMA of a dead entry raises and a read that escapes the masks
shows up as NaN.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from paged_cache import poisoned_cache
from tpu_interpreter import assert_no_races

from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.paged_attention_tpu import paged_attention_tpu

# fp32: both sides compute in fp32 (the kernel's dots at HIGHEST precision) and differ only in
# summation order (online softmax over blocks vs one dense softmax): ~1e-6 observed.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
# bf16: the kernel rounds probabilities to bf16 before P @ V and the output to bf16 (2^-8
# relative), while the reference stays fp32 until the final cast; outputs are averages of
# N(0, 1) values, so 2e-2 covers a few bf16 ulps at |x| ~ 1.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
HEAD_DIM = 128  # TPU lane width: the natural head size, and the one the kernel is tuned for

_seed = itertools.count(int(np.random.SeedSequence().entropy % (2**31)))


def _rng():
    return np.random.default_rng(next(_seed))


def _check(q, k, v, table, lengths, tol, **kwargs):
    out = paged_attention_tpu(q, k, v, table, lengths, interpret=True, **kwargs)
    ref = paged_attention_reference(q, k, v, table, lengths, sm_scale=kwargs.get("sm_scale"))
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "a masked (NaN) slot or page leaked into the output"
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), **tol)
    assert_no_races()
    return out


# page_size 8 (one f32 sublane tile) and pages_per_block 2: lengths 0, a partial page, exactly
# one page, exactly one block, and several blocks ending mid-page; 5 pages per sequence do not
# divide into blocks of 2, so the last block of the table is half outside it.
@pytest.mark.parametrize("kv_heads,group", [(2, 1), (1, 4), (1, 8)])
def test_matches_reference_fp32(kv_heads, group):
    rng = _rng()
    lengths = [0, 5, 8, 16, 37]
    k, v, table, lens = poisoned_cache(rng, lengths, 8, 5, kv_heads, HEAD_DIM, jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * group, HEAD_DIM)), jnp.float32)
    out = _check(q, k, v, table, lens, FP32_TOL, pages_per_block=2)
    np.testing.assert_array_equal(out[0], 0.0)  # length 0 -> zeros


@pytest.mark.parametrize("kv_heads,group", [(2, 1), (2, 4)])
def test_matches_reference_bf16(kv_heads, group):
    # page_size 16: one bf16 sublane tile (bf16 packs two rows per sublane).
    rng = _rng()
    lengths = [16, 3, 0, 45]
    k, v, table, lens = poisoned_cache(rng, lengths, 16, 3, kv_heads, HEAD_DIM, jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * group, HEAD_DIM)), jnp.bfloat16)
    _check(q, k, v, table, lens, BF16_TOL, pages_per_block=2)


# head_dim 64: a kv head is half a 128-lane tile, which a DMA cannot cut out of a page row, so
# heads go in pairs (4 kv heads -> 2 windows) or, when no pairing divides them, all together
# (3 kv heads -> one 192-lane window), with block-diagonal queries.
@pytest.mark.parametrize("kv_heads,group", [(4, 2), (3, 1)])
def test_head_dim_below_the_lane_width(kv_heads, group):
    rng = _rng()
    lengths = [21, 0, 40]
    k, v, table, lens = poisoned_cache(rng, lengths, 8, 5, kv_heads, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * group, 64)), jnp.float32)
    _check(q, k, v, table, lens, FP32_TOL, pages_per_block=2)


def test_default_block_and_scale_and_overlong_length():
    # Default pages_per_block covers the whole table in one block; a length beyond the table is
    # clipped to it, as the reference does; a custom scale must reach the logits.
    rng = _rng()
    lengths = [29, 12]
    k, v, table, lens = poisoned_cache(rng, lengths, 8, 4, 2, HEAD_DIM, jnp.float32)
    # Tokens 29..31 of sequence 0's last page become live once its length is clipped to 32.
    k = jnp.nan_to_num(k, nan=0.5)
    v = jnp.nan_to_num(v, nan=-0.25)
    q = jnp.asarray(rng.standard_normal((2, 4, HEAD_DIM)), jnp.float32)
    _check(q, k, v, table, lens.at[0].set(1000), FP32_TOL, sm_scale=0.3)


def test_one_page_blocks_many_blocks():
    # pages_per_block=1: the double buffer flips every page; 7 pages exercise both slots
    # several times, with the prefetch of page p + 1 in flight while page p is computed.
    rng = _rng()
    lengths = [50, 1, 8]
    k, v, table, lens = poisoned_cache(rng, lengths, 8, 7, 2, HEAD_DIM, jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 4, HEAD_DIM)), jnp.float32)
    _check(q, k, v, table, lens, FP32_TOL, pages_per_block=1)


def test_live_out_of_range_page_is_caught():
    # The checks are live: an out-of-range id *inside* a length is DMA'd and the interpreter
    # raises, so the garbage entries of the other tests are indeed never addressed.
    rng = _rng()
    k, v, table, lens = poisoned_cache(rng, [9], 8, 2, 1, HEAD_DIM, jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, 1, HEAD_DIM)), jnp.float32)
    bad = table.at[0, 1].set(10**6)
    try:
        with pytest.raises(Exception, match="(?i)out-of-bounds"):
            jax.block_until_ready(paged_attention_tpu(q, k, v, bad, lens, interpret=True))
    finally:
        pltpu.reset_tpu_interpret_mode_state()  # the interpreter keeps state after a failure


def test_rejects_mismatched_shapes():
    q = jnp.zeros((2, 6, HEAD_DIM))
    pool = jnp.zeros((4, 8, 4, HEAD_DIM))
    with pytest.raises(ValueError):
        paged_attention_tpu(q, pool, pool, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32),
                            interpret=True)


def test_dispatch_routes_to_tpu_kernel():
    # `paged_attention` reaches this kernel by name (and by default on a TPU); its scale
    # default and pages_per_block pass through.
    rng = _rng()
    lengths = [21, 0, 9]
    k, v, table, lens = poisoned_cache(rng, lengths, 8, 4, 2, HEAD_DIM, jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 4, HEAD_DIM)), jnp.float32)
    ref = paged_attention_reference(q, k, v, table, lens)
    out = paged_attention(q, k, v, table, lens, implementation="pallas_tpu_interpret",
                          pages_per_block=3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **FP32_TOL)


@pytest.mark.parametrize("dtype,page_size,group", [(jnp.float32, 8, 1), (jnp.bfloat16, 16, 8)])
def test_lowers_to_mosaic(dtype, page_size, group):
    # No TPU here: this checks the Pallas -> Mosaic lowering (every primitive has a TPU rule,
    # the scalar-prefetch/DMA/semaphore plumbing types out), not Mosaic's own compiler passes.
    q = jax.ShapeDtypeStruct((4, 2 * group, HEAD_DIM), dtype)
    pool = jax.ShapeDtypeStruct((64, page_size, 2, HEAD_DIM), dtype)
    table = jax.ShapeDtypeStruct((4, 8), jnp.int32)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    lowered = paged_attention_tpu.trace(q, pool, pool, table, lengths, pages_per_block=4).lower(
        lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
