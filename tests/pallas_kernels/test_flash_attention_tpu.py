"""Mosaic TPU flash attention run by the TPU interpreter, against the jnp reference.

The interpreter starts every buffer (VMEM scratch included) as NaN, so the
finiteness checks also catch a kernel that reads state it never initialised
or leaves part of an output unwritten.
"""

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


@pytest.mark.parametrize("segments", [False, True])
def test_gradients_match_reference(segments):
    """Cotangents on both out and lse (ring merges differentiate through lse)."""
    q, k, v = _random_qkv(1, 21, 27, 4, 2, 16)
    seg = (
        {
            "q_segment_ids": _random_segments(1, 21, 2),
            "kv_segment_ids": _random_segments(1, 27, 2),
        }
        if segments
        else {}
    )
    common = dict(causal=True, q_offset=10, kv_offset=0, **seg)
    weights_out = jax.random.normal(jax.random.key(next(_seed)), q.shape)
    weights_lse = jax.random.normal(jax.random.key(next(_seed)), (1, 4, 21))

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out * weights_out) + jnp.sum(finite_lse * weights_lse)

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    got = loss(
        lambda q, k, v: flash_attention_tpu(
            q, k, v, **common, block_q=8, block_k=8, interpret=True
        )
    )
    want = loss(lambda q, k, v: flash_attention_reference(q, k, v, **common))
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(g, w, **FP32_TOL)


def test_rejects_blocks_off_the_sublane_tile():
    q, k, v = _random_qkv(1, 16, 16, 1, 1, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        flash_attention_tpu(q, k, v, block_q=12, interpret=True)


def test_dispatch_opt_in():
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
    # Auto dispatch never picks the TPU kernel on its own.
    assert choose_implementation(q, k, platform="tpu") == "reference"
