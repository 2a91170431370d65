"""Mosaic TPU flash attention run by the TPU interpreter, against the jnp reference.

The interpreter starts every buffer (VMEM scratch included) as NaN, so the
finiteness checks also catch a kernel that reads state it never initialised
or leaves part of an output unwritten.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_tpu import flash_attention_tpu

# fp32: both sides compute in fp32 and differ only in summation order
# (online softmax over kv blocks vs one dense softmax): ~1e-6 observed.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
# bf16: the kernel rounds probabilities to bf16 before P @ V, and both outputs
# are rounded to bf16 (relative step 2^-8).
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}
# Gradients, fp32: the same products summed in another order (blockwise over
# kv blocks, grouped query heads and q blocks vs dense einsums): ~1e-6 absolute
# observed on entries of order 1, so the forward's fp32 tolerance holds them.
GRAD_FP32_TOL = FP32_TOL
# Gradients, bf16: the kernels feed bf16 P and dS to the MXU and round the
# gradients to bf16 (spacing up to 2^-7 relative), where the reference keeps
# fp32 until the final rounding: one bf16 step observed (0.03 at |g| ~ 6,
# 0.008 at |g| ~ 1.5), under 40% of this bound over repeated draws.
GRAD_BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}

_seed = itertools.count(np.random.SeedSequence().entropy % (2**31))


def _random_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(next(_seed)), 3)
    q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _random_segments(batch, length, num_segments):
    """Sorted packed-sequence ids with random boundaries."""
    rng = np.random.default_rng(next(_seed))
    return jnp.asarray(
        np.sort(rng.integers(0, num_segments, size=(batch, length)), axis=1), jnp.int32
    )


def _assert_matches(got, want, tol):
    out, lse = (np.asarray(x, np.float32) for x in got)
    ref_out, ref_lse = (np.asarray(x, np.float32) for x in want)
    assert np.isfinite(out).all(), (
        "kernel output has NaN/inf (unwritten or uninitialised memory?)"
    )
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(
        np.where(empty, 0.0, lse), np.where(empty, 0.0, ref_lse), **FP32_TOL
    )
    np.testing.assert_allclose(out, ref_out, **tol)
    # Rows that see no key come out exactly zero.
    assert not np.any(out[np.transpose(empty, (0, 2, 1))])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 4])
def test_forward_matches_reference(causal, group):
    # 37 and 45 divide neither block; q_len != kv_len; two batch rows.
    q, k, v = _random_qkv(2, 37, 45, 2 * group, 2, 32)
    got = flash_attention_tpu(
        q, k, v, causal=causal, block_q=16, block_k=16, interpret=True
    )
    _assert_matches(got, flash_attention_reference(q, k, v, causal=causal), FP32_TOL)


def test_default_blocks_and_scale():
    q, k, v = _random_qkv(1, 20, 20, 2, 1, 16)
    got = flash_attention_tpu(q, k, v, sm_scale=0.3, interpret=True)
    _assert_matches(got, flash_attention_reference(q, k, v, sm_scale=0.3), FP32_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_ids(causal):
    q, k, v = _random_qkv(2, 40, 40, 4, 2, 16)
    seg = _random_segments(2, 40, 3)
    got = flash_attention_tpu(
        q, k, v, causal=causal, q_segment_ids=seg, block_q=16, block_k=8, interpret=True
    )
    _assert_matches(
        got,
        flash_attention_reference(q, k, v, causal=causal, q_segment_ids=seg),
        FP32_TOL,
    )


def test_segment_ids_with_different_lengths():
    q, k, v = _random_qkv(1, 24, 33, 2, 2, 16)
    q_seg, kv_seg = _random_segments(1, 24, 2), _random_segments(1, 33, 2)
    common = {
        "causal": True,
        "q_segment_ids": q_seg,
        "kv_segment_ids": kv_seg,
        "q_offset": 9,
        "kv_offset": 0,
    }
    got = flash_attention_tpu(q, k, v, **common, block_q=8, block_k=16, interpret=True)
    _assert_matches(got, flash_attention_reference(q, k, v, **common), FP32_TOL)


def test_traced_offsets_one_compile_with_fully_masked_blocks():
    """Offsets are traced (one ring step is one call); early q rows see no key."""
    q, k, v = _random_qkv(1, 30, 26, 4, 1, 16)
    traces = []

    @jax.jit
    def run(q_offset, kv_offset):
        traces.append(None)
        return flash_attention_tpu(
            q,
            k,
            v,
            q_offset=q_offset,
            kv_offset=kv_offset,
            block_q=8,
            block_k=8,
            interpret=True,
        )

    # kv_offset 20 > q_offset 0: the first 20 query rows (2.5 q blocks) are
    # fully masked, so whole (q block, kv block) pairs are skipped.
    for q_offset, kv_offset in [(0, 20), (26, 0), (5, 5)]:
        got = run(jnp.int32(q_offset), jnp.int32(kv_offset))
        want = flash_attention_reference(
            q, k, v, q_offset=q_offset, kv_offset=kv_offset
        )
        _assert_matches(got, want, FP32_TOL)
    assert len(traces) == 1
    _got_out, got_lse = run(jnp.int32(0), jnp.int32(20))
    assert np.isneginf(np.asarray(got_lse)[:, :, :20]).all()
    assert np.isfinite(np.asarray(got_lse)[:, :, 20:]).all()


def test_bf16():
    q, k, v = _random_qkv(1, 50, 50, 4, 2, 32, jnp.bfloat16)
    got = flash_attention_tpu(q, k, v, block_q=16, block_k=16, interpret=True)
    out, lse = got
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    ref_out, ref_lse = flash_attention_reference(q, k, v)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **BF16_TOL
    )
    # lse comes from fp32 scores of the same bf16 inputs: no bf16 rounding in it.
    np.testing.assert_allclose(lse, ref_lse, **FP32_TOL)


def _loss_gradients(q):
    """attention -> jitted ``(q, k, v, *args) -> (dq, dk, dv)`` of one random loss.

    The loss uses both outputs with random weights (ring merges differentiate
    through lse), the same weights for every attention it is given; rows with
    lse = -inf enter through a where, as a merge treats them.
    """
    batch, q_len, q_heads, _ = q.shape
    weights_out = jax.random.normal(jax.random.key(next(_seed)), q.shape)
    weights_lse = jax.random.normal(
        jax.random.key(next(_seed)), (batch, q_heads, q_len)
    )

    def loss(attention, q, k, v, *args):
        out, lse = attention(q, k, v, *args)
        finite_lse = jnp.where(jnp.isfinite(lse), lse * weights_lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * weights_out) + jnp.sum(finite_lse)

    def gradients_of(attention):
        return jax.jit(jax.grad(functools.partial(loss, attention), argnums=(0, 1, 2)))

    return gradients_of


def _assert_gradients_close(got, want, dtype, tol):
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), f"d{name} has NaN/inf"
        assert np.abs(w).max() > 0, f"reference d{name} is all zero"
        np.testing.assert_allclose(g, w, **tol, err_msg=f"d{name}")


def _assert_gradients_match(q, k, v, tol=None, *, block_q=16, block_k=16, **common):
    gradients_of = _loss_gradients(q)
    got = gradients_of(
        lambda q, k, v: flash_attention_tpu(
            q, k, v, **common, block_q=block_q, block_k=block_k, interpret=True
        )
    )(q, k, v)
    want = gradients_of(lambda q, k, v: flash_attention_reference(q, k, v, **common))(
        q, k, v
    )
    _assert_gradients_close(got, want, q.dtype, tol or GRAD_FP32_TOL)
    return got


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 4])
def test_gradients_match_reference(causal, group):
    # 37 and 45 divide neither block: padded q rows and kv columns in both
    # backward kernels; group 4 sums dK/dV over the query heads in-kernel (two
    # kv heads, so the head mapping is exercised). One batch row for group 4
    # keeps the interpreter's grid short; group 1 covers the batch index.
    batch = 2 if group == 1 else 1
    q, k, v = _random_qkv(batch, 37, 45, 2 * group, 2, 32)
    _assert_gradients_match(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_with_segments_and_rows_seeing_no_key(causal):
    q, k, v = _random_qkv(1, 37, 45, 4, 2, 32)
    q_seg = np.array(_random_segments(1, 37, 3))
    kv_seg = np.asarray(_random_segments(1, 45, 3))
    # Segment 7 has no keys: those rows get lse = -inf and must get zero dq.
    q_seg[:, 5:11] = 7
    common = {
        "q_segment_ids": jnp.asarray(q_seg),
        "kv_segment_ids": jnp.asarray(kv_seg),
        "q_offset": 6,  # segments and a causal shift together
    }
    dq, _dk, _dv = _assert_gradients_match(q, k, v, causal=causal, **common)
    assert not np.asarray(dq)[:, 5:11].any()


def test_gradients_traced_offsets_one_compile():
    """Both signs of q_offset - kv_offset through one jitted backward."""
    q, k, v = _random_qkv(1, 37, 45, 4, 1, 32)
    traces = []

    def kernel(q, k, v, q_offset, kv_offset):
        traces.append(None)
        return flash_attention_tpu(
            q,
            k,
            v,
            q_offset=q_offset,
            kv_offset=kv_offset,
            block_q=16,
            block_k=16,
            interpret=True,
        )

    def reference(q, k, v, q_offset, kv_offset):
        return flash_attention_reference(
            q, k, v, q_offset=q_offset, kv_offset=kv_offset
        )

    gradients_of = _loss_gradients(q)
    kernel_gradients, reference_gradients = (
        gradients_of(kernel),
        gradients_of(reference),
    )
    # (0, 20): the first 20 query rows see no key, so whole q blocks of the dK/dV
    # sweep and kv blocks of dQ are skipped; (30, 0): rows see past the diagonal;
    # (3, 30): only the last 10 rows see anything.
    for q_offset, kv_offset in [(0, 20), (30, 0), (3, 30)]:
        offsets = (jnp.int32(q_offset), jnp.int32(kv_offset))
        got = kernel_gradients(q, k, v, *offsets)
        want = reference_gradients(q, k, v, *offsets)
        _assert_gradients_close(got, want, q.dtype, GRAD_FP32_TOL)
        blind_rows = max(0, kv_offset - q_offset)
        assert not np.asarray(got[0])[:, :blind_rows].any()
    assert len(traces) == 1


def test_gradients_bf16():
    q, k, v = _random_qkv(1, 37, 45, 4, 2, 32, jnp.bfloat16)
    _assert_gradients_match(q, k, v, GRAD_BF16_TOL, causal=True)


def test_rejects_blocks_off_the_sublane_tile():
    q, k, v = _random_qkv(1, 16, 16, 1, 1, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        flash_attention_tpu(q, k, v, block_q=12, interpret=True)


def test_dispatch_routes_to_tpu_kernel():
    from pallas_kernels.flash_attention import (
        choose_implementation,
        flash_attention,
        flash_attention_with_lse,
    )

    q, k, v = _random_qkv(1, 12, 12, 2, 1, 16)
    got_out = flash_attention(
        q, k, v, implementation="pallas_tpu_interpret", block_q=8, block_k=8
    )
    got = flash_attention_with_lse(q, k, v, implementation="pallas_tpu_interpret")
    want = flash_attention_reference(q, k, v)
    _assert_matches(got, want, FP32_TOL)
    np.testing.assert_allclose(got_out, want[0], **FP32_TOL)
    assert choose_implementation(q, k, platform="tpu") == "pallas_tpu"
