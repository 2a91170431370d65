"""Flash attention: reference vs a naive loop, Pallas kernels (interpret mode) vs
the reference, partial merges, dispatch, and the GPU (Triton) lowering.

Pallas' interpreter fills every output buffer with NaN before a kernel runs, so
the finiteness checks below also catch elements a kernel forgot to write.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (
    choose_implementation,
    flash_attention,
    flash_attention_pallas,
    flash_attention_reference,
    flash_attention_with_lse,
    merge_attention_partials,
)

# fp32: both paths do fp32 arithmetic and differ only in summation order
# (online softmax over blocks vs one dense softmax): ~1e-6 observed.
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16: the kernel rounds probabilities to bf16 before P @ V (as every fast
# flash kernel does) and both outputs round to bf16 (2^-8 relative).
BF16_TOL = dict(atol=3e-2, rtol=3e-2)

_seed = itertools.count(np.random.SeedSequence().entropy % (2**31))


def _random_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    key = jax.random.key(next(_seed))
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _random_segments(batch, length, num_segments):
    """Sorted packed-sequence ids, e.g. [0,0,0,1,1,2,...], random boundaries."""
    rng = np.random.default_rng(next(_seed))
    ids = np.sort(rng.integers(0, num_segments, size=(batch, length)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def _naive_attention(q, k, v, *, causal, scale, q_seg, kv_seg, q_offset, kv_offset):
    """Loop over (batch, head, query): repeated K/V heads, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((batch, q_heads, q_len), -np.inf)
    for b, h, i in itertools.product(range(batch), range(q_heads), range(q_len)):
        scores = k[b, :, h // group] @ q[b, i, h] * scale
        visible = np.ones(k.shape[1], bool)
        if causal:
            visible &= kv_offset + np.arange(k.shape[1]) <= q_offset + i
        if q_seg is not None:
            visible &= np.asarray(kv_seg[b]) == int(q_seg[b, i])
        if visible.any():
            s = scores[visible]
            lse[b, h, i] = np.log(np.sum(np.exp(s - s.max()))) + s.max()
            out[b, i, h] = np.exp(s - lse[b, h, i]) @ v[b, visible, h // group]
    return out, lse


def _assert_lse_close(lse, ref_lse, tol):
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], **tol)


def test_reference_matches_naive_loop():
    q, k, v = _random_qkv(2, 11, 14, 4, 2, 8)
    q_seg = _random_segments(2, 11, 3)
    kv_seg = _random_segments(2, 14, 3)
    kwargs = dict(causal=True, q_offset=5, kv_offset=7)
    out, lse = flash_attention_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **kwargs)
    want_out, want_lse = _naive_attention(q, k, v, scale=8**-0.5, q_seg=q_seg, kv_seg=kv_seg, **kwargs)
    # Query 0 sits at position 5 < kv_offset 7: it must see nothing.
    assert np.isneginf(np.asarray(lse)[:, :, 0]).all()
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)  # fp32 vs float64
    _assert_lse_close(lse, want_lse, dict(atol=1e-5, rtol=1e-5))


FORWARD_CASES = {
    # name: (batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal, segments,
    #        q_offset, kv_offset, dtype, block_q, block_k)
    "causal_mha_fp32": (2, 37, 37, 2, 2, 16, True, False, 0, 0, jnp.float32, 16, 16),
    "noncausal_gqa4_segments_qlen_ne_kvlen": (1, 29, 50, 8, 2, 32, False, True, 0, 0, jnp.float32, 16, 32),
    "causal_gqa8_offsets": (1, 23, 45, 8, 1, 16, True, False, 30, 11, jnp.float32, 16, 16),
    "causal_gqa4_segments_bf16": (2, 61, 61, 4, 1, 32, True, True, 0, 0, jnp.bfloat16, 32, 16),
    "head_dim_24_padded": (1, 40, 33, 2, 1, 24, True, False, 4, 0, jnp.float32, 32, 16),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_pallas_forward_matches_reference(name):
    (
        batch,
        q_len,
        kv_len,
        q_heads,
        kv_heads,
        head_dim,
        causal,
        segments,
        q_offset,
        kv_offset,
        dtype,
        block_q,
        block_k,
    ) = FORWARD_CASES[name]
    q, k, v = _random_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype)
    seg = {}
    if segments:
        seg = dict(
            q_segment_ids=_random_segments(batch, q_len, 3), kv_segment_ids=_random_segments(batch, kv_len, 3)
        )
    common = dict(causal=causal, q_offset=q_offset, kv_offset=kv_offset, **seg)
    out, lse = flash_attention_pallas(q, k, v, block_q=block_q, block_k=block_k, interpret=True, **common)
    ref_out, ref_lse = flash_attention_reference(q, k, v, **common)
    tol = BF16_TOL if dtype == jnp.bfloat16 else FP32_TOL
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (batch, q_heads, q_len)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol)
    _assert_lse_close(lse, ref_lse, FP32_TOL if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2))


def _loss_with_lse(attention, w_out, w_lse):
    """A scalar that depends on both outputs, so both cotangents are non-zero."""

    def loss(q, k, v):
        out, lse = attention(q, k, v)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)

    return loss


GRAD_CASES = {
    # name: (batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal, segments, dtype)
    "causal_gqa4_segments_offsets_fp32": (1, 45, 45, 4, 1, 16, True, True, jnp.float32),
    "noncausal_mha_qlen_ne_kvlen_d24": (2, 20, 37, 2, 2, 24, False, False, jnp.float32),
    "causal_gqa2_bf16": (1, 50, 50, 4, 2, 32, True, False, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_pallas_gradients_match_reference(name):
    batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal, segments, dtype = GRAD_CASES[name]
    q, k, v = _random_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype)
    common = dict(causal=causal)
    if segments:
        common.update(
            q_segment_ids=_random_segments(batch, q_len, 2), kv_segment_ids=_random_segments(batch, kv_len, 2)
        )
    key_out, key_lse = jax.random.split(jax.random.key(next(_seed)))
    w_out = jax.random.normal(key_out, q.shape)
    w_lse = jax.random.normal(key_lse, (batch, q_heads, q_len))
    offsets = jnp.asarray([7, 3], jnp.int32)  # traced offsets, as in a ring step

    def pallas_attention(q, k, v):
        return flash_attention_pallas(
            q,
            k,
            v,
            q_offset=offsets[0],
            kv_offset=offsets[1],
            block_q=16,
            block_k=16,
            backward_block_sizes=(16, 32, 32, 16),
            interpret=True,
            **common,
        )

    def reference_attention(q, k, v):
        return flash_attention_reference(q, k, v, q_offset=offsets[0], kv_offset=offsets[1], **common)

    grads = jax.jit(jax.grad(_loss_with_lse(pallas_attention, w_out, w_lse), argnums=(0, 1, 2)))(q, k, v)
    # The reference runs in fp32 even for bf16 inputs: it is the accuracy target.
    up = lambda x: x.astype(jnp.float32)
    want = jax.grad(_loss_with_lse(reference_attention, w_out, w_lse), argnums=(0, 1, 2))(up(q), up(k), up(v))
    for name_, got, ref in zip("qkv", grads, want):
        assert got.dtype == dtype, name_
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all(), name_
        if dtype == jnp.bfloat16:
            # bf16 gradients: bf16 P and dS operands and bf16 outputs; compare
            # relative to the gradient's scale.
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got / scale, np.asarray(ref) / scale, atol=3e-2, err_msg=name_)
        else:
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=name_)


def test_fully_masked_rows_give_zero_output_neg_inf_lse_and_finite_grads():
    # Queries at positions 0..19, keys at 12..42: the first 12 queries see nothing.
    q, k, v = _random_qkv(1, 20, 31, 2, 1, 16)
    kwargs = dict(causal=True, q_offset=0, kv_offset=12)
    out, lse = flash_attention_pallas(q, k, v, block_q=16, block_k=16, interpret=True, **kwargs)
    assert (np.asarray(out)[:, :12] == 0).all()
    assert np.isneginf(np.asarray(lse)[:, :, :12]).all()
    ref_out, ref_lse = flash_attention_reference(q, k, v, **kwargs)
    np.testing.assert_allclose(out, ref_out, **FP32_TOL)
    _assert_lse_close(lse, ref_lse, FP32_TOL)

    loss = lambda q, k, v: jnp.sum(
        flash_attention_pallas(q, k, v, block_q=16, block_k=16, interpret=True, **kwargs)[0] ** 2
    )
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
    assert (np.asarray(dq)[:, :12] == 0).all()  # nothing visible, nothing to learn


MERGE_CASES = {
    # name: (q_offset, split, second-half kv_offset); keys of the first half
    # sit at 0..split-1.
    "second_half_partly_masked": (10, 24, 24),
    "second_half_fully_masked": (0, 24, 64),  # all keys of part b are in the future
}


@pytest.mark.parametrize("implementation", ["reference", "pallas_interpret"])
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_of_key_partials_equals_full_attention(case, implementation):
    q_offset, split, offset_b = MERGE_CASES[case]
    q, k, v = _random_qkv(2, 40, 57, 4, 2, 16)
    kv_pos = jnp.concatenate([jnp.arange(split), offset_b + jnp.arange(57 - split)])

    def attend_part(lo, hi, kv_offset):
        return flash_attention_with_lse(
            q,
            k[:, lo:hi],
            v[:, lo:hi],
            causal=True,
            q_offset=q_offset,
            kv_offset=kv_offset,
            implementation=implementation,
            **({"block_q": 16, "block_k": 16} if implementation != "reference" else {}),
        )

    out_a, lse_a = attend_part(0, split, 0)
    out_b, lse_b = attend_part(split, 57, offset_b)
    if case == "second_half_fully_masked":
        assert np.isneginf(np.asarray(lse_b)).all()
    out, lse = merge_attention_partials(out_a, lse_a, out_b, lse_b)

    # Full attention with the same absolute key positions, as a dense mask.
    q_pos = q_offset + jnp.arange(40)
    visible = kv_pos[None, :] <= q_pos[:, None]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * 16**-0.5
    scores = jnp.where(visible, scores, -jnp.inf)
    want_lse = jax.nn.logsumexp(scores, axis=-1)
    want_out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(scores - want_lse[..., None]), jnp.repeat(v, 2, axis=2))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, want_out, **FP32_TOL)
    _assert_lse_close(lse, want_lse, FP32_TOL)


def test_gradients_through_merged_pallas_partials_match_full_reference():
    # A ring step differentiates through merge, i.e. through lse: this checks
    # the kernels' handling of the lse cotangent, including an empty partial row.
    q, k, v = _random_qkv(1, 24, 40, 4, 2, 16)
    w = jax.random.normal(jax.random.key(next(_seed)), q.shape)
    opts = dict(block_q=16, block_k=16, backward_block_sizes=(16, 16, 16, 16), interpret=True)

    def ring_of_two(q, k, v):
        a = flash_attention_pallas(q, k[:, :20], v[:, :20], q_offset=12, kv_offset=0, **opts)
        b = flash_attention_pallas(q, k[:, 20:], v[:, 20:], q_offset=12, kv_offset=20, **opts)
        return jnp.sum(merge_attention_partials(*a, *b)[0] * w)

    def full(q, k, v):
        return jnp.sum(flash_attention_reference(q, k, v, q_offset=12, kv_offset=0)[0] * w)

    got = jax.grad(ring_of_two, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(full, argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=name)


def test_merge_of_two_empty_partials_stays_empty_and_differentiable():
    out = jax.random.normal(jax.random.key(next(_seed)), (1, 3, 2, 4))
    lse = jnp.full((1, 2, 3), -jnp.inf)
    merged, merged_lse = merge_attention_partials(out * 0, lse, out * 0, lse)
    assert (np.asarray(merged) == 0).all() and np.isneginf(np.asarray(merged_lse)).all()
    grad = jax.grad(lambda o: jnp.sum(merge_attention_partials(o, lse, o, lse)[0]))(out)
    assert np.isfinite(np.asarray(grad)).all()


def test_dispatch_rules_and_implementations_agree():
    q16 = jax.ShapeDtypeStruct((1, 64, 4, 128), jnp.bfloat16)
    q32 = jax.ShapeDtypeStruct((1, 64, 4, 128), jnp.float32)
    assert choose_implementation(q16, q16, platform="cpu") == "reference"
    assert choose_implementation(q16, q16, platform="gpu") == "cudnn"
    assert choose_implementation(q32, q32, platform="gpu") == "pallas"
    assert choose_implementation(q16, q16, platform="gpu", need_lse=True) == "pallas"
    assert choose_implementation(q16, q16, platform="gpu", has_segments=True) == "pallas"
    assert choose_implementation(q16, q16, platform="gpu", q_offset=jnp.int32(3)) == "pallas"
    assert choose_implementation(q16, q16, platform="tpu") == "pallas_tpu"
    if jax.default_backend() == "cpu":
        assert choose_implementation(q16, q16) == "reference"

    q, k, v = _random_qkv(2, 19, 19, 4, 2, 16)
    want = flash_attention_reference(q, k, v, causal=True)[0]
    for implementation in (None, "reference", "xla", "pallas_interpret"):
        got = flash_attention(q, k, v, causal=True, implementation=implementation)
        np.testing.assert_allclose(got, want, **FP32_TOL, err_msg=str(implementation))

    with pytest.raises(ValueError):
        flash_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError):
        flash_attention(q, k, v, implementation="xla", q_segment_ids=jnp.zeros((2, 19), jnp.int32))
    with pytest.raises(ValueError):
        flash_attention(q, k, v, implementation="cudnn", q_offset=3)
    with pytest.raises(ValueError):
        flash_attention_with_lse(q, k, v, implementation="xla")
    with pytest.raises(ValueError):
        flash_attention_pallas(q, k, v, block_q=24, interpret=True)  # not a power of two


def test_gpu_lowering_emits_three_triton_kernels():
    """Lower fwd+bwd for CUDA on this CPU machine: every kernel must pass the
    Pallas Triton lowering (power-of-two tiles, supported ops) before it ever
    meets a GPU. Compiling Triton IR to PTX still happens only on the GPU."""
    q = jax.ShapeDtypeStruct((2, 300, 8, 80), jnp.bfloat16)  # 300 and 80 need padding
    kv = jax.ShapeDtypeStruct((2, 333, 2, 80), jnp.bfloat16)
    q_seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    kv_seg = jax.ShapeDtypeStruct((2, 333), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def train_step(q, k, v, q_seg, kv_seg, offset):
        def loss(q, k, v):
            out, lse = flash_attention_pallas(
                q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=offset
            )
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    lowered = jax.jit(train_step).trace(q, kv, kv, q_seg, kv_seg, offset).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    for kernel in ("flash_attention_forward", "flash_attention_dq", "flash_attention_dkv"):
        assert kernel in text
