"""Paged attention: references vs a naive loop, the Pallas kernels (interpret mode) and the XLA
path vs the references, dispatch, and the GPU (Triton) lowering.

Every cache built here is poisoned: each slot that holds no live token (spare pages, the tail of
a sequence's last page) is NaN, and page-table entries past a sequence's length are random
garbage, often out of range. Any read that escapes the masks shows up as NaN in the output.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_cache import poisoned_cache

from pallas_kernels.paged_attention import (
    _resolve,
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

# fp32: kernel and reference both compute in fp32 and differ only in summation order (online
# softmax over tiles and splits vs one dense softmax): ~1e-6 observed.
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16: the kernels round probabilities to bf16 before P @ V, as fast flash kernels do, and both
# outputs round to bf16 (2^-8 relative); outputs are averages of N(0, 1) values.
BF16_TOL = dict(atol=2e-2, rtol=2e-2)

_seed = itertools.count(int(np.random.SeedSequence().entropy % (2**31)))


def _rng():
    return np.random.default_rng(next(_seed))


def _naive_attention(q, k_pages, v_pages, table, query_positions, scale):
    """float64 loop: q [rows, q_heads, d]; query_positions: (seq, position) per row or None."""
    q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    table = np.asarray(table)
    page_size = k_pages.shape[1]
    group = q.shape[1] // k_pages.shape[2]
    out = np.zeros_like(q)
    for row, where in enumerate(query_positions):
        if where is None:
            continue
        seq, position = where
        for h in range(q.shape[1]):
            keys, values = [], []
            for t in range(position + 1):
                page, slot = table[seq, t // page_size], t % page_size
                keys.append(k_pages[page, slot, h // group])
                values.append(v_pages[page, slot, h // group])
            if not keys:
                continue
            scores = np.array(keys) @ q[row, h] * scale
            weights = np.exp(scores - scores.max())
            out[row, h] = weights @ np.array(values) / weights.sum()
    return out


def _assert_close(actual, expected, dtype):
    actual = np.asarray(actual.astype(jnp.float32))
    assert np.isfinite(actual).all()
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(actual, np.asarray(expected, np.float32), **tol)


# ----------------------------------------------------------------------------- decode

_DECODE_LENGTHS = [0, 1, 7, 16, 23, 45, 48]  # page 8, 6 pages/seq: empty, partial, full (48)


def test_decode_reference_matches_naive_loop():
    rng = _rng()
    k, v, table, lengths = poisoned_cache(rng, _DECODE_LENGTHS, 8, 6, 2, 16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(_DECODE_LENGTHS), 8, 16)), jnp.float32)
    out = paged_attention_reference(q, k, v, table, lengths, sm_scale=0.3)
    # The decode query sits after the last stored token: it sees positions 0 .. length-1.
    where = [(s, n - 1) if n else None for s, n in enumerate(_DECODE_LENGTHS)]
    expected = _naive_attention(q, k, v, table, where, 0.3)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[0]).any()  # length 0 -> zeros


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA 1, 4, 8
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_pallas_matches_reference(q_heads, kv_heads, dtype):
    rng = _rng()
    head_dim = 32
    k, v, table, lengths = poisoned_cache(rng, _DECODE_LENGTHS, 8, 6, kv_heads, head_dim, dtype)
    q = jnp.asarray(rng.standard_normal((len(_DECODE_LENGTHS), q_heads, head_dim)), dtype)
    expected = paged_attention_reference(q, k, v, table, lengths)
    out = paged_attention(q, k, v, table, lengths, implementation="pallas_interpret")
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close(out, expected.astype(jnp.float32), dtype)
    assert not np.asarray(out[0].astype(jnp.float32)).any()


@pytest.mark.parametrize("num_splits,pages_per_block", [(1, 2), (3, 2), (2, 4)])
def test_decode_pallas_splits_and_tiles(num_splits, pages_per_block):
    """Splitting the context (3 splits of 6 pages leaves uneven and empty splits) and changing
    the tile size must not change the result."""
    rng = _rng()
    k, v, table, lengths = poisoned_cache(rng, _DECODE_LENGTHS, 8, 6, 2, 16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(_DECODE_LENGTHS), 8, 16)), jnp.float32)
    expected = paged_attention_reference(q, k, v, table, lengths)
    out = paged_attention(q, k, v, table, lengths, implementation="pallas_interpret",
                          num_splits=num_splits, pages_per_block=pages_per_block)
    _assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_xla_matches_reference(dtype):
    rng = _rng()
    k, v, table, lengths = poisoned_cache(rng, _DECODE_LENGTHS, 4, 12, 2, 16, dtype)
    q = jnp.asarray(rng.standard_normal((len(_DECODE_LENGTHS), 8, 16)), dtype)
    expected = paged_attention_reference(q, k, v, table, lengths)
    out = paged_attention(q, k, v, table, lengths, implementation="xla")
    _assert_close(out, expected.astype(jnp.float32), dtype)


# ----------------------------------------------------------------------------- ragged

# (kv_len, q_len): full prefill, prefill chunk, first decode, idle, empty, decode at a full
# sequence (6 pages x 8), chunk of 5, long chunk crossing several query blocks.
_RAGGED = [(37, 37), (45, 13), (1, 1), (20, 0), (0, 0), (48, 1), (23, 5), (40, 33)]


def _ragged_inputs(rng, q_heads, kv_heads, head_dim, dtype, pad_rows=5):
    kv_lens = [kv for kv, _ in _RAGGED]
    k, v, table, kv_lengths = poisoned_cache(rng, kv_lens, 8, 6, kv_heads, head_dim, dtype)
    cu = np.concatenate([[0], np.cumsum([ql for _, ql in _RAGGED])]).astype(np.int32)
    q = rng.standard_normal((cu[-1] + pad_rows, q_heads, head_dim)).astype(np.float32)
    q[cu[-1]:] = np.nan  # padding rows must not matter
    return jnp.asarray(q, dtype), k, v, table, kv_lengths, jnp.asarray(cu)


def test_ragged_reference_matches_naive_loop():
    rng = _rng()
    q, k, v, table, kv_lengths, cu = _ragged_inputs(rng, 4, 2, 16, jnp.float32)
    out = ragged_paged_attention_reference(q, k, v, table, kv_lengths, cu, sm_scale=0.25)
    where = [None] * q.shape[0]
    for s, (kv_len, q_len) in enumerate(_RAGGED):
        for i in range(q_len):
            where[int(cu[s]) + i] = (s, kv_len - q_len + i)
    expected = _naive_attention(np.nan_to_num(np.asarray(q)), k, v, table, where, 0.25)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[int(cu[-1]):]).any()


@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_pallas_matches_reference(q_heads, kv_heads, dtype):
    rng = _rng()
    q, k, v, table, kv_lengths, cu = _ragged_inputs(rng, q_heads, kv_heads, 32, dtype)
    expected = ragged_paged_attention_reference(q, k, v, table, kv_lengths, cu)
    out = ragged_paged_attention(q, k, v, table, kv_lengths, cu,
                                 implementation="pallas_interpret")
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close(out, expected.astype(jnp.float32), dtype)
    assert not np.asarray(out[int(cu[-1]):].astype(jnp.float32)).any()


@pytest.mark.parametrize("implementation,block_q", [("pallas_interpret", 32),
                                                    ("xla", 4), ("xla", None)])
def test_ragged_block_sizes_and_xla(implementation, block_q):
    """Query blocks smaller and larger than the chunks; the XLA path shares the blocking."""
    rng = _rng()
    q, k, v, table, kv_lengths, cu = _ragged_inputs(rng, 8, 2, 16, jnp.float32)
    expected = ragged_paged_attention_reference(q, k, v, table, kv_lengths, cu)
    out = ragged_paged_attention(q, k, v, table, kv_lengths, cu, implementation=implementation,
                                 block_q=block_q)
    _assert_close(out, expected, jnp.float32)


def test_ragged_all_decode_equals_decode():
    """q_len 1 everywhere: the ragged call is paged decode."""
    rng = _rng()
    k, v, table, lengths = poisoned_cache(rng, [5, 17, 48, 30], 8, 6, 2, 16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((4, 8, 16)), jnp.float32)
    cu = jnp.arange(5, dtype=jnp.int32)
    decode = paged_attention_reference(q, k, v, table, lengths)
    ragged = ragged_paged_attention(q, k, v, table, lengths, cu, implementation="pallas_interpret")
    _assert_close(ragged, decode, jnp.float32)


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_on_cpu_uses_reference_and_validates():
    rng = _rng()
    k, v, table, lengths = poisoned_cache(rng, [3, 9], 8, 2, 1, 16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 2, 16)), jnp.float32)
    auto = paged_attention(q, k, v, table, lengths)
    # Same reference math, jitted vs eager: only XLA's fusion choices differ.
    np.testing.assert_allclose(np.asarray(auto),
                               np.asarray(paged_attention_reference(q, k, v, table, lengths)),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="implementation"):
        paged_attention(q, k, v, table, lengths, implementation="cuda")
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q[:, :1].repeat(3, axis=1), k[..., :1, :].repeat(2, axis=2),
                        v[..., :1, :].repeat(2, axis=2), table, lengths)
    k6, v6, table6, lengths6 = poisoned_cache(rng, [3, 9], 6, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):  # page size 6 cannot tile for Triton
        paged_attention(q, k6, v6, table6, lengths6, implementation="pallas_interpret")


def test_dispatch_by_backend():
    assert _resolve(None, 16, 128, backend="cpu") == "reference"
    # TPU: the Mosaic kernels, whatever the page size (they need no power-of-two tiles).
    assert _resolve(None, 16, 128, backend="tpu") == "pallas_tpu"
    assert _resolve(None, 6, 96, backend="tpu") == "pallas_tpu"
    assert _resolve("pallas_tpu_interpret", 6, 96) == "pallas_tpu_interpret"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_lowering_emits_triton_kernels(dtype, verified_triton_modules):
    """Lower for CUDA on this CPU machine: both kernels must pass the Pallas Triton lowering
    (power-of-two tiles, supported ops) before they ever meet a GPU."""
    sds = jax.ShapeDtypeStruct
    q = sds((4, 32, 128), dtype)
    pages = sds((300, 16, 8, 128), dtype)
    table = sds((4, 70), jnp.int32)
    lengths = sds((4,), jnp.int32)
    text = paged_attention.trace(q, pages, pages, table, lengths, implementation="pallas").lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "paged_decode_attention" in text
    q_ragged = sds((300, 32, 128), dtype)
    cu = sds((5,), jnp.int32)
    text = ragged_paged_attention.trace(q_ragged, pages, pages, table, lengths, cu,
                                        implementation="pallas").lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "ragged_paged_attention" in text
    if verified_triton_modules is not None:
        assert verified_triton_modules and all(verified_triton_modules)
