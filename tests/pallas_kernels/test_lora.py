"""Batched LoRA (BGMV / SGMV): references vs a naive per-token loop, the Pallas kernels
(interpret mode) and the XLA path vs the references, dispatch, and the GPU (Triton) lowering.

Adapters have mixed ranks zero-padded to max_rank; rows of x that no adapter should read
(index -1, tokens past the last segment) are NaN, so a kernel that touches them fails.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_inputs import random_adapters

from pallas_kernels.lora import _resolve, bgmv, bgmv_reference, sgmv, sgmv_reference

# fp32: same fp32 math, different summation order (chunked in_dim, split reductions).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16: Punica's and vLLM's tolerances for their bf16 LoRA kernels (y rounds to bf16).
BF16_TOL = dict(atol=2e-2, rtol=3e-2)

_seed = itertools.count(int(np.random.SeedSequence().entropy % (2**31)))


def _rng():
    return np.random.default_rng(next(_seed))


def _activations(rng, num_tokens, in_dim, out_dim, dtype, dead_rows):
    x = rng.standard_normal((num_tokens, in_dim))
    x[dead_rows] = np.nan
    y = rng.standard_normal((num_tokens, out_dim))
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _naive_lora(y, x, a, b, scales, ranks, indices):
    """float64 per-token loop that reads only each adapter's true rank."""
    y, x, a, b, scales = (np.asarray(t, np.float64) for t in (y, x, a, b, scales))
    out = y.copy()
    for t, i in enumerate(indices):
        if i < 0:
            continue
        r = ranks[i]
        out[t] += (x[t] @ a[i, :, :r]) @ b[i, :r, :] * scales[i]
    return out


def _assert_close(actual, expected, dtype):
    actual = np.asarray(actual.astype(jnp.float32))
    assert np.isfinite(actual).all()
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(actual, np.asarray(expected, np.float32), **tol)


def _segments_to_indices(starts, adapters, num_tokens):
    indices = np.full(num_tokens, -1)
    for s, adapter in enumerate(adapters):
        indices[starts[s]:starts[s + 1]] = adapter
    return indices


# ----------------------------------------------------------------------------- references


def test_references_match_naive_loop():
    rng = _rng()
    num_tokens, in_dim, out_dim = 29, 40, 24
    a, b, scales, ranks = random_adapters(rng, 6, in_dim, out_dim, 8, jnp.float32)
    indices = rng.integers(-1, 6, num_tokens)
    x, y = _activations(rng, num_tokens, in_dim, out_dim, jnp.float32, indices < 0)
    out = bgmv_reference(y, x, a, b, jnp.asarray(indices, jnp.int32), scales)
    expected = _naive_lora(y, np.nan_to_num(np.asarray(x)), a, b, scales, ranks, indices)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)

    starts, adapters = [0, 4, 4, 15, 22], [3, 1, -1, 5]  # an empty segment, tokens 22.. unused
    seg_indices = _segments_to_indices(starts, adapters, num_tokens)
    x, y = _activations(rng, num_tokens, in_dim, out_dim, jnp.float32, seg_indices < 0)
    out = sgmv_reference(y, x, a, b, jnp.asarray(starts, jnp.int32),
                         jnp.asarray(adapters, jnp.int32), scales)
    expected = _naive_lora(y, np.nan_to_num(np.asarray(x)), a, b, scales, ranks, seg_indices)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bgmv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens,num_adapters", [(37, 5), (45, 60), (1, 3)])
def test_bgmv_pallas_matches_reference(dtype, num_tokens, num_adapters):
    """Few adapters (blocks of shared adapters), more adapters than tokens, a single token."""
    rng = _rng()
    in_dim, out_dim = 48, 80  # in: 3 chunks of 16; out: 5 tiles of 16
    a, b, scales, _ = random_adapters(rng, num_adapters, in_dim, out_dim, 16, dtype)
    indices = rng.integers(-1, num_adapters, num_tokens)
    indices[0] = num_adapters - 1
    x, y = _activations(rng, num_tokens, in_dim, out_dim, dtype, indices < 0)
    indices = jnp.asarray(indices, jnp.int32)
    expected = bgmv_reference(y, x, a, b, indices, scales)
    out = bgmv(y, x, a, b, indices, scales, implementation="pallas_interpret")
    assert out.dtype == dtype and out.shape == y.shape
    _assert_close(out, expected.astype(jnp.float32), dtype)
    untouched = np.asarray(indices) < 0
    np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(y)[untouched])


def test_bgmv_one_adapter_many_tokens_and_k_split():
    """70 tokens of one adapter span 5 blocks; in_dim 512 = 2 chunks of 256, split over
    programs because few blocks exist."""
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 3, 512, 32, 32, jnp.float32)
    indices = jnp.full((70,), 2, jnp.int32)
    x, y = _activations(rng, 70, 512, 32, jnp.float32, np.zeros(70, bool))
    expected = bgmv_reference(y, x, a, b, indices, scales)
    out = bgmv(y, x, a, b, indices, scales, implementation="pallas_interpret")
    _assert_close(out, expected, jnp.float32)
    assert np.abs(np.asarray(out - y)).max() > 0.1  # the adapter did change y


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bgmv_xla_matches_reference(dtype):
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 9, 40, 24, 8, dtype)
    indices = rng.integers(-1, 9, 33)
    x, y = _activations(rng, 33, 40, 24, dtype, np.zeros(33, bool))
    indices = jnp.asarray(indices, jnp.int32)
    expected = bgmv_reference(y, x, a, b, indices, scales)
    _assert_close(bgmv(y, x, a, b, indices, scales, implementation="xla"),
                  expected.astype(jnp.float32), dtype)


# ----------------------------------------------------------------------------- sgmv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sgmv_pallas_matches_reference(dtype):
    rng = _rng()
    num_tokens, in_dim, out_dim, num_adapters = 90, 48, 80, 7
    a, b, scales, _ = random_adapters(rng, num_adapters, in_dim, out_dim, 32, dtype)
    # Uneven segments: 1 token, empty, 40 (crosses blocks of 16), adapter -1, 17, tokens 83..
    # past the end stay unchanged.
    starts = [0, 1, 1, 41, 50, 67, 83]
    adapters = [4, 2, 6, -1, 0, 6]
    seg_indices = _segments_to_indices(starts, adapters, num_tokens)
    x, y = _activations(rng, num_tokens, in_dim, out_dim, dtype, seg_indices < 0)
    starts, adapters = jnp.asarray(starts, jnp.int32), jnp.asarray(adapters, jnp.int32)
    expected = sgmv_reference(y, x, a, b, starts, adapters, scales)
    out = sgmv(y, x, a, b, starts, adapters, scales, implementation="pallas_interpret",
               block_tokens=16)
    assert out.dtype == dtype
    _assert_close(out, expected.astype(jnp.float32), dtype)
    untouched = seg_indices < 0
    np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(y)[untouched])


def test_sgmv_xla_and_default_blocks_match_reference():
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 4, 64, 48, 16, jnp.float32)
    starts, adapters = [0, 50, 53, 99], [1, 3, 0]
    seg_indices = _segments_to_indices(starts, adapters, 101)
    x, y = _activations(rng, 101, 64, 48, jnp.float32, seg_indices < 0)
    starts, adapters = jnp.asarray(starts, jnp.int32), jnp.asarray(adapters, jnp.int32)
    expected = sgmv_reference(y, x, a, b, starts, adapters, scales)
    for implementation in ("xla", "pallas_interpret"):
        out = sgmv(y, x, a, b, starts, adapters, scales, implementation=implementation)
        _assert_close(out, expected, jnp.float32)


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_on_cpu_uses_reference_and_validates():
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 3, 32, 32, 8, jnp.float32)
    x, y = _activations(rng, 5, 32, 32, jnp.float32, np.zeros(5, bool))
    indices = jnp.asarray([0, -1, 2, 1, 2], jnp.int32)
    # Same reference math, jitted vs eager: only XLA's fusion choices differ.
    np.testing.assert_allclose(np.asarray(bgmv(y, x, a, b, indices, scales)),
                               np.asarray(bgmv_reference(y, x, a, b, indices, scales)),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="implementation"):
        bgmv(y, x, a, b, indices, scales, implementation="triton")
    with pytest.raises(ValueError, match="max_rank"):  # rank 8 < 16 cannot feed a Triton dot
        bgmv(y, x, a, b, indices, scales, implementation="pallas_interpret")
    a16, b16, scales16, _ = random_adapters(rng, 3, 32, 32, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_tokens"):
        bgmv(y, x, a16, b16, indices, scales16, implementation="pallas_interpret",
             block_tokens=8)
    with pytest.raises(ValueError, match="lora_b"):
        bgmv(y, x, a16, b16[:, :, :16], indices, scales16)


def test_dispatch_by_backend():
    assert _resolve(None, 4096, 4096, 64, backend="cpu") == "reference"
    # TPU: the Mosaic kernel for any shape (rank 8, odd dims), never the per-token gather.
    assert _resolve(None, 4096, 4096, 64, backend="tpu") == "pallas_tpu"
    assert _resolve(None, 96, 40, 8, backend="tpu") == "pallas_tpu"


@pytest.mark.parametrize("tokens", [1, 64])  # 1 token: one block, in_dim split over programs
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_lowering_emits_triton_kernels(tokens, dtype, verified_triton_modules):
    """Lower for CUDA on this CPU machine: shrink and expand must pass the Pallas Triton
    lowering before they ever meet a GPU."""
    sds = jax.ShapeDtypeStruct
    dim, adapters, rank = 4096, 100, 64
    args = (sds((tokens, dim), dtype), sds((tokens, dim), dtype),
            sds((adapters, dim, rank), dtype), sds((adapters, rank, dim), dtype))
    scales = sds((adapters,), jnp.float32)
    text = bgmv.trace(*args, sds((tokens,), jnp.int32), scales, implementation="pallas").lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "lora_shrink" in text and "lora_expand" in text
    text = sgmv.trace(*args, sds((5,), jnp.int32), sds((4,), jnp.int32), scales,
                      implementation="pallas").lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
    if verified_triton_modules is not None:
        assert verified_triton_modules and all(verified_triton_modules)
