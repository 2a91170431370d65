"""The fused ring-attention TPU kernel, run by the TPU interpreter on simulated devices.

Each test shards the sequence over a ring of simulated CPU devices with
``jax.shard_map``; the interpreter simulates every device's VMEM, the remote
DMAs between neighbours and the semaphores, and (``interpret=True``) runs its
happens-before race detector. The result is checked against
``flash_attention_reference`` on the whole, unsharded sequence. Buffers start
as NaN, so the finiteness checks also catch unwritten output or state read
before it was initialised.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tpu_interpreter import assert_no_races

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.ring_attention_tpu import ring_attention_jnp, ring_attention_tpu

# fp32: both sides compute in fp32 and differ only in summation order (online
# softmax over kv blocks and ring steps vs one dense softmax): ~1e-6 observed.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
# bf16: the kernel rounds probabilities to bf16 before P @ V and both outputs
# are rounded to bf16 (relative step 2^-8); lse stays fp32 on both sides but
# the scores come from bf16 inputs multiplied in a different order.
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}

_seed = itertools.count(np.random.SeedSequence().entropy % (2**31))


def _random_qkv(batch, seq_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(next(_seed)), 3)
    q = jax.random.normal(kq, (batch, seq_len, q_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, seq_len, kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _sharded(fn, mesh, seq_axis="sp", batch_axis=None):
    """``fn`` under shard_map: the sequence split over ``seq_axis``, in model layout."""
    rows = P(batch_axis, seq_axis)
    return jax.jit(
        jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(rows, rows, rows),
            out_specs=(rows, P(batch_axis, None, seq_axis)),
        )
    )


def _ring_mesh(ring_size):
    return Mesh(np.array(jax.devices()[:ring_size]), ("sp",))


def _assert_matches(got, want, tol):
    out, lse = (np.asarray(x, np.float32) for x in got)
    ref_out, ref_lse = (np.asarray(x, np.float32) for x in want)
    assert np.isfinite(out).all() and np.isfinite(lse).all(), (
        "NaN/inf: unwritten output or uninitialised state?"
    )
    np.testing.assert_allclose(lse, ref_lse, **tol)
    np.testing.assert_allclose(out, ref_out, **tol)
    assert_no_races()


@pytest.mark.parametrize(
    "ring_size, causal, group",
    [
        (4, True, 1),
        (4, True, 4),
        (4, False, 1),
        (4, False, 4),
        (2, True, 4),
        (2, False, 1),
        (1, True, 1),
    ],
)
def test_matches_reference_on_full_sequence(ring_size, causal, group):
    # 12 tokens per device: 2 x 2 blocks of 8 with a padded tail in every
    # shard. Small, because race detection makes the interpreter ~8x slower.
    batch = 2 if group == 1 else 1
    q, k, v = _random_qkv(batch, 12 * ring_size, 2 * group, 2, 16)
    ring = _sharded(
        lambda q, k, v: ring_attention_tpu(
            q, k, v, axis_name="sp", causal=causal, block_q=8, block_k=8, interpret=True
        ),
        _ring_mesh(ring_size),
    )
    _assert_matches(
        ring(q, k, v), flash_attention_reference(q, k, v, causal=causal), FP32_TOL
    )


def test_bf16_default_blocks():
    q, k, v = _random_qkv(1, 4 * 24, 4, 1, 32, dtype=jnp.bfloat16)
    ring = _sharded(
        lambda q, k, v: ring_attention_tpu(
            q, k, v, axis_name="sp", sm_scale=0.2, interpret=True
        ),
        _ring_mesh(4),
    )
    want = flash_attention_reference(q, k, v, sm_scale=0.2)
    _assert_matches(ring(q, k, v), want, BF16_TOL)


def test_ring_axis_inside_a_2d_mesh():
    # Batch over "data", sequence over "sp": remote copies must address the
    # neighbour in the same data row (the other coordinate is kept).
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "sp"))
    q, k, v = _random_qkv(2, 2 * 16, 2, 2, 16)
    ring = _sharded(
        lambda q, k, v: ring_attention_tpu(
            q, k, v, axis_name="sp", block_q=8, block_k=16, interpret=True
        ),
        mesh,
        batch_axis="data",
    )
    _assert_matches(ring(q, k, v), flash_attention_reference(q, k, v), FP32_TOL)


def test_gradients_match_reference():
    q, k, v = _random_qkv(1, 4 * 12, 4, 2, 16)
    cot_out, _, _ = _random_qkv(1, 4 * 12, 4, 2, 16)
    cot_lse = jax.random.normal(jax.random.key(next(_seed)), (1, 4, 4 * 12))

    def loss(attention):
        def f(q, k, v):
            out, lse = attention(q, k, v)
            return jnp.sum(out * cot_out) + jnp.sum(lse * cot_lse)

        return f

    ring = _sharded(
        lambda q, k, v: ring_attention_tpu(
            q, k, v, axis_name="sp", block_q=8, block_k=8, interpret=True
        ),
        _ring_mesh(4),
    )
    got = jax.grad(loss(ring), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(flash_attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_plain_ring_matches_reference():
    q, k, v = _random_qkv(1, 3 * 10, 4, 2, 16)
    ring = _sharded(
        lambda q, k, v: ring_attention_jnp(q, k, v, axis_name="sp"), _ring_mesh(3)
    )
    _assert_matches(ring(q, k, v), flash_attention_reference(q, k, v), FP32_TOL)


def test_rejects_unequal_local_lengths():
    q, k, v = _random_qkv(1, 16, 2, 2, 16)
    with pytest.raises(ValueError, match="equal local q and kv lengths"):
        _sharded(
            lambda q, k, v: ring_attention_tpu(
                q, k[:, :4], v[:, :4], axis_name="sp", interpret=True
            ),
            _ring_mesh(2),
        )(q, k, v)
