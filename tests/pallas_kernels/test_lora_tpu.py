"""Mosaic TPU batched LoRA (BGMV / SGMV), run by the TPU interpreter on CPU, vs the references.

The interpreter simulates HBM, VMEM, SMEM and the pipeline's DMAs, with race detection,
NaN-filled uninitialised buffers and out-of-bounds reads raising. Adapters have mixed ranks
zero-padded to max_rank; rows of x that no adapter should use (index -1, tokens outside every
segment) are NaN, so a kernel whose row mask blends instead of selecting fails; y starts random,
so an update that overwrites rather than accumulates, or touches a row it should not, fails.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_inputs import random_adapters
from tpu_interpreter import assert_no_races

from pallas_kernels import lora_tpu
from pallas_kernels.lora import bgmv, bgmv_reference, sgmv, sgmv_reference
from pallas_kernels.lora_tpu import bgmv_tpu, sgmv_tpu

# fp32: same fp32 math as the reference (dots at HIGHEST), another summation order.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bf16: Punica's and vLLM's tolerances for their bf16 LoRA kernels (y rounds to bf16).
BF16_TOL = {"atol": 2e-2, "rtol": 3e-2}

_seed = itertools.count(int(np.random.SeedSequence().entropy % (2**31)))


def _rng():
    return np.random.default_rng(next(_seed))


def _activations(rng, in_dim, out_dim, dtype, dead_rows):
    """x (NaN on dead rows) and a random y, one row per entry of the bool mask `dead_rows`."""
    x = rng.standard_normal((dead_rows.shape[0], in_dim))
    x[dead_rows] = np.nan
    y = rng.standard_normal((dead_rows.shape[0], out_dim))
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _segments_to_indices(starts, adapters, num_tokens):
    indices = np.full(num_tokens, -1)
    for s, adapter in enumerate(adapters):
        indices[starts[s]:starts[s + 1]] = adapter
    return indices


def _check(out, expected, y, dead_rows, dtype):
    assert out.dtype == y.dtype and out.shape == y.shape
    actual = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(actual).all(), "a NaN row of x leaked into y"
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(actual, np.asarray(expected.astype(jnp.float32)), **tol)
    np.testing.assert_array_equal(np.asarray(out)[dead_rows], np.asarray(y)[dead_rows])
    assert_no_races()


# ----------------------------------------------------------------------------- bgmv


# (tokens, adapters, block): few adapters sharing 16-row tiles (37 does not divide 16); more
# adapters than tokens, nearly one group per token; one token (the tile is the full dim);
# one adapter over 5 tiles.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens,num_adapters,block", [(37, 5, 16), (45, 60, 16), (1, 3, 16),
                                                           (70, 1, 16)])
def test_bgmv_matches_reference(dtype, num_tokens, num_adapters, block):
    rng = _rng()
    in_dim, out_dim = 256, 128
    a, b, scales, _ = random_adapters(rng, num_adapters, in_dim, out_dim, 16, dtype)
    indices = rng.integers(-1, num_adapters, num_tokens)
    indices[0] = num_adapters - 1
    x, y = _activations(rng, in_dim, out_dim, dtype, indices < 0)
    indices = jnp.asarray(indices, jnp.int32)
    out = bgmv_tpu(y, x, a, b, indices, scales, block_tokens=block, interpret=True)
    _check(out, bgmv_reference(y, x, a, b, indices, scales), y, np.asarray(indices) < 0, dtype)


def test_bgmv_no_live_token_leaves_y_unchanged():
    """Every index -1 or out of range: no visit is live, yet tile 0 is written back."""
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 4, 128, 128, 16, jnp.float32)
    indices = jnp.asarray(rng.choice([-1, 4, 99], 21), jnp.int32)
    x, y = _activations(rng, 128, 128, jnp.float32, np.ones(21, bool))
    out = bgmv_tpu(y, x, a, b, indices, scales, block_tokens=8, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))


def test_in_dim_chunks_and_out_lane_chunks(monkeypatch):
    """in_dim 384 in 3 chunks of 128 (the fp32 xa accumulates across grid steps) and out_dim
    640 in 5 expand chunks of 128; max_rank 32 with mixed ranks."""
    monkeypatch.setattr(lora_tpu, "_MAX_BLOCK_K", 128)
    assert lora_tpu._lane_divisor(640, lora_tpu._LANE_CHUNK) == 128
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 6, 384, 640, 32, jnp.float32)
    indices = rng.integers(-1, 6, 29)
    x, y = _activations(rng, 384, 640, jnp.float32, indices < 0)
    indices = jnp.asarray(indices, jnp.int32)
    out = bgmv_tpu.__wrapped__(y, x, a, b, indices, scales, block_tokens=8, interpret=True)
    _check(out, bgmv_reference(y, x, a, b, indices, scales), y, np.asarray(indices) < 0,
           jnp.float32)


# ----------------------------------------------------------------------------- sgmv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sgmv_matches_reference(dtype):
    """Tokens 0-2 before the first segment, 1 token, empty, 38 (over three tiles of 16),
    adapter -1, 17, an out-of-range adapter, tokens 86.. past the end: all unchanged or
    updated as the reference says."""
    rng = _rng()
    num_tokens, in_dim, out_dim, num_adapters = 90, 128, 256, 7
    a, b, scales, _ = random_adapters(rng, num_adapters, in_dim, out_dim, 64, dtype)
    starts = [3, 4, 4, 42, 50, 67, 83, 86]
    adapters = [4, 2, 6, -1, 0, 6, 7]
    indices = _segments_to_indices(starts, adapters, num_tokens)
    indices[indices >= num_adapters] = -1
    x, y = _activations(rng, in_dim, out_dim, dtype, indices < 0)
    starts, adapters = jnp.asarray(starts, jnp.int32), jnp.asarray(adapters, jnp.int32)
    out = sgmv_tpu(y, x, a, b, starts, adapters, scales, block_tokens=16, interpret=True)
    _check(out, sgmv_reference(y, x, a, b, starts, adapters, scales), y, indices < 0, dtype)


def test_sgmv_few_long_segments_default_tiles():
    """Two adapters over 300 tokens with the default 128-row tiles (300 does not divide)."""
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 3, 128, 128, 16, jnp.bfloat16)
    starts, adapters = [0, 170, 300], [2, 0]
    x, y = _activations(rng, 128, 128, jnp.bfloat16, np.zeros(300, bool))
    starts, adapters = jnp.asarray(starts, jnp.int32), jnp.asarray(adapters, jnp.int32)
    out = sgmv_tpu(y, x, a, b, starts, adapters, scales, interpret=True)
    _check(out, sgmv_reference(y, x, a, b, starts, adapters, scales), y, np.zeros(300, bool),
           jnp.bfloat16)


# ----------------------------------------------------------------------------- visits


def test_visits_cover_every_tile_group_overlap_once():
    """The static visit bound holds and live visits are exactly the (tile, group) overlaps, in
    row order; spare visits repeat the last live tile and adapter."""
    rng = _rng()
    for _ in range(6):  # each draw is a new shape: a new trace
        num_tokens, block = int(rng.integers(1, 200)), int(rng.choice([8, 16, 32]))
        num_groups = int(rng.integers(1, 12))
        cuts = np.sort(rng.integers(0, num_tokens + 1, num_groups + 1))
        adapters = rng.integers(-1, 5, num_groups)
        num_tiles = -(-num_tokens // block)
        num_visits = num_tiles + min(num_groups, num_tokens) - 1
        tile, adapter, lo, hi = (np.asarray(v) for v in lora_tpu._visits(
            jnp.asarray(cuts, jnp.int32), jnp.asarray(adapters, jnp.int32), block, num_visits))
        expected = [(t, adapters[g], cuts[g], cuts[g + 1]) for g in range(num_groups)
                    if adapters[g] >= 0 and cuts[g + 1] > cuts[g]
                    for t in range(cuts[g] // block, (cuts[g + 1] - 1) // block + 1)]
        live = hi > lo
        assert live.sum() == len(expected) <= num_visits
        assert list(zip(tile[live], adapter[live], lo[live], hi[live])) == expected
        if expected and not live.all():
            assert (tile[~live] == expected[-1][0]).all()
            assert (adapter[~live] == expected[-1][1]).all()


# ----------------------------------------------------------------------------- dispatch


def test_entry_points_route_pallas_tpu_interpret():
    """bgmv/sgmv with "pallas_tpu_interpret" run this kernel (its pallas_call appears in the
    jaxpr, and the result is bit-identical), accept ranks the Triton path refuses (8), and
    validate block_tokens; "pallas_tpu" traces to the same kernel."""
    rng = _rng()
    a, b, scales, _ = random_adapters(rng, 3, 128, 128, 8, jnp.float32)
    indices = jnp.asarray([0, -1, 2, 1, 2], jnp.int32)
    x, y = _activations(rng, 128, 128, jnp.float32, np.asarray(indices) < 0)
    starts, adapters = jnp.asarray([0, 2, 5], jnp.int32), jnp.asarray([1, 2], jnp.int32)
    for implementation in ("pallas_tpu_interpret", "pallas_tpu"):
        for fn, args in ((bgmv, (indices,)), (sgmv, (starts, adapters))):
            call = functools.partial(fn, implementation=implementation)
            assert "lora_grouped_tpu" in str(jax.make_jaxpr(call)(y, x, a, b, *args, scales))
    out = bgmv(y, x, a, b, indices, scales, implementation="pallas_tpu_interpret")
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(bgmv_tpu(y, x, a, b, indices, scales, interpret=True)))
    _check(out, bgmv_reference(y, x, a, b, indices, scales), y, np.asarray(indices) < 0,
           jnp.float32)
    x, y = _activations(rng, 128, 128, jnp.float32, np.zeros(5, bool))  # every row is used
    out = sgmv(y, x, a, b, starts, adapters, scales, implementation="pallas_tpu_interpret")
    _check(out, sgmv_reference(y, x, a, b, starts, adapters, scales), y, np.zeros(5, bool),
           jnp.float32)
    with pytest.raises(ValueError, match="block_tokens"):
        sgmv(y, x, a, b, starts, adapters, scales, implementation="pallas_tpu_interpret",
             block_tokens=12)
