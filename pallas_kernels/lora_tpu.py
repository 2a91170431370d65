"""Batched LoRA (BGMV / SGMV) as one Mosaic TPU kernel (semantics: `lora.bgmv_reference`).

Mosaic cannot gather rows of x or y with vector indices, so the kernel runs on rows that are
already contiguous per adapter ("groups"): SGMV segments are; BGMV sorts tokens by adapter with
jnp first, runs the same kernel on the sorted rows and un-permutes y afterwards.

Layout on the chip:
  - rows are cut into tiles of `block_tokens` at fixed offsets (a BlockSpec addresses whole
    blocks), so a tile may hold the end of one group and the start of the next. The first grid
    axis walks "visits", one per overlapping (tile, group) pair in row order, as JAX's megablox
    grouped matmul does. A visit computes its whole tile with its group's adapter and keeps the
    result only on the group's rows [lo, hi) (a row mask; other rows keep their value);
  - each visit's tile, adapter and [lo, hi) are scalar-prefetch operands (SMEM), read by the
    index maps: the pipeline DMAs just that adapter's A chunk and B, never a gathered copy;
  - groups of adapter -1 (and tokens past the last segment) get no visit, so their rows are
    neither computed nor written, and y keeps them because the output aliases y. The visit
    count is a static upper bound; spare visits at the end repeat the last live visit's block
    indices, so the pipeline fetches nothing for them, and they compute nothing.

Shrink and expand are fused; the grid is (visit, in_dim chunk). `xa = x_tile @ A` accumulates
in fp32 VMEM scratch over the in_dim chunks, and the last chunk applies `xa @ B * scale` (B
whole, [max_rank, out_dim]) to the y tile, also whole rows [block_tokens, out_dim]. Why fused:
xa (block_tokens x max_rank fp32, a few KiB) never goes to HBM and back, there is one launch,
and the y tile stays resident in VMEM across the consecutive visits of a tile, so each row of
y is read and written once. Two kernels would round-trip xa, and an expand kernel that tiles
out_dim revisits each y tile once per out tile. The price: out_dim is not tiled, so VMEM holds
four [block_tokens, out_dim] buffers (y in, y out, two slots each) and two of B; `_block_sizes`
shrinks the blocks to fit the scoped VMEM default, and raises the limit only when it must.

Megacore (v4, v5p): a y tile carries from one visit to the next, so the visit axis (and the
in_dim reduction) are "arbitrary": one TensorCore per chip runs the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lora import _check_shapes
from pallas_kernels._mosaic_tpu import LANES, SMEM, SQUEEZED, CompilerParams, interpret_params, round_up

_MAX_BLOCK_K = 4096  # in_dim chunk: at 4096 the whole in_dim, so A is fetched once per visit
_LANE_CHUNK = 512  # out_dim columns per expand step: bounds the fp32 temporaries
# Keep the kernel's buffers under the smallest scoped-VMEM default (16 MiB on v4/v5e/v5p).
_VMEM_BUDGET = 12 * 1024 * 1024

# Default tile rows. Decode (BGMV): few tokens per adapter, so small tiles waste little MXU
# work on other groups' rows; prefill (SGMV): long segments, one MXU-height tile.
BGMV_BLOCK_TOKENS = 16
SGMV_BLOCK_TOKENS = 128


# ----------------------------------------------------------------------------- sizing


def _lane_divisor(n: int, cap: int) -> int:
    """Largest multiple of 128 dividing n, at most cap; n itself if 128 does not divide it."""
    if n % LANES:
        return n
    return max(d for d in range(LANES, min(n, cap) + 1, LANES) if n % d == 0)


def _tile_bytes(rows, cols, dtype):
    """VMEM bytes of a [rows, cols] buffer: (sublane, 128) tiles, 16 sublanes for 16-bit."""
    itemsize = jnp.dtype(dtype).itemsize
    return round_up(rows, 32 // itemsize) * round_up(cols, LANES) * itemsize


def _vmem_bytes(bt, bk, x, lora_a, lora_b, y, lane_chunk):
    max_rank, out_dim = lora_b.shape[1:]
    buffers = 2 * (_tile_bytes(bt, bk, x.dtype) + _tile_bytes(bk, max_rank, lora_a.dtype)
                   + _tile_bytes(max_rank, out_dim, lora_b.dtype)
                   + 2 * _tile_bytes(bt, out_dim, y.dtype))
    scratch = _tile_bytes(bt, max_rank, jnp.float32)
    temporaries = 4 * _tile_bytes(bt, lane_chunk, jnp.float32) + _tile_bytes(bt, bk, jnp.float32)
    return buffers + scratch + temporaries


def _block_sizes(x, lora_a, lora_b, y, block_tokens):
    """(tile rows, in_dim chunk, out_dim chunk, vmem limit or None) for these operands.

    Until the buffers fit `_VMEM_BUDGET`, halves the in_dim chunk (down to 512) or the tile
    rows, whichever side (x and A, or the y tiles) holds more; if even the smallest do not fit
    (a huge max_rank x out_dim B), asks Mosaic for more scoped VMEM.
    """
    num_tokens, in_dim = x.shape
    max_rank, out_dim = lora_b.shape[1:]
    lane_chunk = _lane_divisor(out_dim, _LANE_CHUNK)
    bk = _lane_divisor(in_dim, _MAX_BLOCK_K)
    bt = min(num_tokens, block_tokens)  # the full dim, or a multiple of 8

    def size():
        return _vmem_bytes(bt, bk, x, lora_a, lora_b, y, lane_chunk)

    def can_halve_bk(floor):
        return bk > floor and bk % (2 * LANES) == 0 and in_dim % (bk // 2) == 0

    while size() > _VMEM_BUDGET:
        can_halve_bt = bt % 16 == 0 and bt < num_tokens
        k_side = _tile_bytes(bt, bk, x.dtype) + _tile_bytes(bk, max_rank, lora_a.dtype)
        if can_halve_bk(512) and (k_side >= 2 * _tile_bytes(bt, out_dim, y.dtype)
                                  or not can_halve_bt):
            bk //= 2
        elif can_halve_bt:
            bt //= 2
        elif can_halve_bk(LANES):
            bk //= 2
        else:
            break
    limit = None if size() <= _VMEM_BUDGET else size() + 4 * 1024 * 1024
    return bt, bk, lane_chunk, limit


# ----------------------------------------------------------------------------- visits


def _visits(group_starts, group_adapters, block_tokens, num_visits):
    """Per visit (static count, an upper bound): tile, adapter, and the group's rows [lo, hi).

    Group g covers rows [group_starts[g], group_starts[g + 1]) (non-decreasing starts); groups
    of adapter -1 are skipped. A spare visit has lo = hi = 0 and repeats the tile and adapter of
    the last live visit (tile 0, adapter 0 when none is live), so its blocks are already there.
    """
    num_groups = group_adapters.shape[0]
    lo = group_starts[:-1]
    hi = jnp.where(group_adapters >= 0, group_starts[1:], lo)
    first_tile = lax.div(lo, block_tokens)
    tiles = jnp.where(hi > lo, lax.div(hi - 1, block_tokens) - first_tile + 1, 0)
    visit_end = jnp.cumsum(tiles)
    visit = jnp.arange(num_visits, dtype=jnp.int32)
    group = jnp.searchsorted(visit_end, visit, side="right").astype(jnp.int32)
    live = group < num_groups
    group = jnp.minimum(group, num_groups - 1)
    tile = first_tile[group] + visit - (visit_end[group] - tiles[group])
    adapter = group_adapters[group]
    last = jnp.maximum(visit_end[-1] - 1, 0)
    any_live = visit_end[-1] > 0
    tile = jnp.where(live, tile, jnp.where(any_live, tile[last], 0))
    adapter = jnp.where(live, adapter, jnp.where(any_live, adapter[last], 0))
    as_i32 = lambda v: v.astype(jnp.int32)
    return (as_i32(tile), as_i32(adapter), as_i32(jnp.where(live, lo[group], 0)),
            as_i32(jnp.where(live, hi[group], 0)))


# ----------------------------------------------------------------------------- kernel


def _dot(a, b, precision=None):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _expand_dot(xa, b):
    """fp32 xa [rows, rank] @ b [rank, cols] -> fp32.

    With bf16 B, xa splits into a bf16 head and a bf16 tail (head + tail = xa to ~16 mantissa
    bits) and two native MXU passes replace the ~6 passes of an fp32 HIGHEST dot; B's own
    bf16 rounding dominates what remains.
    """
    if b.dtype == jnp.bfloat16:
        head = xa.astype(jnp.bfloat16)
        tail = (xa - head.astype(jnp.float32)).astype(jnp.bfloat16)
        return _dot(head, b) + _dot(tail, b)
    return _dot(xa, b.astype(jnp.float32), lax.Precision.HIGHEST)


def _lora_kernel(tile_ref, adapter_ref, lo_ref, hi_ref, scales_ref, x_ref, a_ref, b_ref, y_ref,
                 out_ref, xa_ref, *, block_tokens, lane_chunk, compute_dtype):
    visit, k = pl.program_id(0), pl.program_id(1)  # outside pl.when (interpreter)
    last_k = pl.num_programs(1) - 1
    tile, lo, hi = tile_ref[visit], lo_ref[visit], hi_ref[visit]
    live = hi > lo
    first_of_tile = (visit == 0) | (tile != tile_ref[jnp.maximum(visit - 1, 0)])

    # The out tile is written back whenever the tile changes, visited rows or not: start it as y.
    @pl.when(first_of_tile & (k == 0))
    def _():
        out_ref[...] = y_ref[...]

    @pl.when(live & (k == 0))
    def _():
        xa_ref[...] = jnp.zeros(xa_ref.shape, jnp.float32)

    @pl.when(live)
    def _():
        precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
        xa_ref[...] += _dot(x_ref[...].astype(compute_dtype), a_ref[...].astype(compute_dtype),
                            precision)

    @pl.when(live & (k == last_k))
    def _():
        xa = xa_ref[...]
        scale = scales_ref[adapter_ref[visit]]
        shape = (xa.shape[0], lane_chunk)
        row = tile * block_tokens + lax.broadcasted_iota(jnp.int32, shape, 0)
        in_group = (row >= lo) & (row < hi)

        def expand(chunk, carry):
            cols = pl.ds(pl.multiple_of(chunk * lane_chunk, lane_chunk), lane_chunk)
            old = out_ref[:, cols]
            new = old.astype(jnp.float32) + _expand_dot(xa, b_ref[:, cols]) * scale
            # A select, not a blend: other groups' rows of x may be NaN or garbage.
            out_ref[:, cols] = jnp.where(in_group, new.astype(old.dtype), old)
            return carry

        lax.fori_loop(0, out_ref.shape[1] // lane_chunk, expand, 0)


def _grouped_lora_tpu(y, x, lora_a, lora_b, scales, group_starts, group_adapters, *,
                      block_tokens, interpret):
    """y with rows [starts[g], starts[g + 1]) updated by adapter group_adapters[g] (-1: none)."""
    if block_tokens < 8 or block_tokens % 8:
        raise ValueError(f"block_tokens must be a positive multiple of 8, got {block_tokens}")
    num_tokens, in_dim = x.shape
    max_rank, out_dim = lora_b.shape[1:]
    bt, bk, lane_chunk, vmem_limit = _block_sizes(x, lora_a, lora_b, y, block_tokens)
    num_tiles = -(-num_tokens // bt)
    # Groups are disjoint and ordered: a tile boundary splits at most one group per extra
    # visit, so visits <= tiles + (non-empty groups - 1).
    num_visits = num_tiles + min(group_adapters.shape[0], num_tokens) - 1
    visits = _visits(group_starts, group_adapters, bt, num_visits)
    num_k = in_dim // bk
    padded_rows = num_tiles * bt - num_tokens
    if interpret and padded_rows:
        # jax 0.10's TPU interpreter returns an aliased output at its block-padded size, so
        # interpret mode pads the last tile itself -- with NaN, as a chip's partial block
        # holds garbage there. On a TPU, Mosaic clips the partial block: no copy.
        x = jnp.pad(x, ((0, padded_rows), (0, 0)), constant_values=jnp.nan)
        y = jnp.pad(y, ((0, padded_rows), (0, 0)), constant_values=jnp.nan)

    def k_live(k, lo_ref, hi_ref, v):
        # Spare visits name the chunk the last live visit ended on: no new DMA.
        return jnp.where(hi_ref[v] > lo_ref[v], k, num_k - 1)

    def x_map(v, k, tile_ref, adapter_ref, lo_ref, hi_ref):
        return tile_ref[v], k_live(k, lo_ref, hi_ref, v)

    def a_map(v, k, tile_ref, adapter_ref, lo_ref, hi_ref):
        return adapter_ref[v], k_live(k, lo_ref, hi_ref, v), 0

    def b_map(v, k, tile_ref, adapter_ref, lo_ref, hi_ref):
        return adapter_ref[v], 0, 0

    def y_map(v, k, tile_ref, adapter_ref, lo_ref, hi_ref):
        return tile_ref[v], 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(num_visits, num_k),
        in_specs=[
            pl.BlockSpec(memory_space=SMEM),  # scales, indexed by adapter
            pl.BlockSpec((bt, bk), x_map),
            pl.BlockSpec((SQUEEZED, bk, max_rank), a_map),
            pl.BlockSpec((SQUEEZED, max_rank, out_dim), b_map),
            pl.BlockSpec((bt, out_dim), y_map),
        ],
        out_specs=pl.BlockSpec((bt, out_dim), y_map),
        scratch_shapes=[pltpu.VMEM((bt, max_rank), jnp.float32)],
    )
    kernel = functools.partial(_lora_kernel, block_tokens=bt, lane_chunk=lane_chunk,
                               compute_dtype=jnp.promote_types(x.dtype, lora_a.dtype))
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        # Operand 8 is y (after the 4 visit arrays, scales, x, A, B): rows no visit writes keep
        # y's values, and y is updated in place when the caller donates it.
        input_output_aliases={len(visits) + 4: 0},
        compiler_params=CompilerParams(dimension_semantics=("arbitrary", "arbitrary"),
                                        vmem_limit_bytes=vmem_limit),
        interpret=interpret_params() if interpret else False,
        name="lora_grouped_tpu",
    )(*visits, scales.astype(jnp.float32), x, lora_a, lora_b, y)
    return out[:num_tokens]


# ----------------------------------------------------------------------------- entry points


@functools.partial(jax.jit, static_argnames=("block_tokens", "interpret"))
def bgmv_tpu(y, x, lora_a, lora_b, indices, scales, *, block_tokens=BGMV_BLOCK_TOKENS,
             interpret=False):
    """Decode LoRA on TPU, one adapter index per token; semantics of `bgmv_reference`.

    Tokens are sorted by adapter (stable), the grouped kernel runs on the sorted rows with one
    group per adapter, and y is un-permuted. Tokens of adapter -1 (or out of range) sort last,
    past every group, so the kernel never touches them. `interpret=True` runs the TPU
    interpreter (any backend; for tests).
    """
    _check_shapes(y, x, lora_a, lora_b, scales)
    num_tokens = x.shape[0]
    num_adapters = lora_a.shape[0]
    if num_tokens == 0:
        return y
    indices = indices.astype(jnp.int32)
    key = jnp.where((indices >= 0) & (indices < num_adapters), indices, num_adapters)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.bincount(key, length=num_adapters + 1)[:num_adapters]
    group_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    group_adapters = jnp.arange(num_adapters, dtype=jnp.int32)
    out = _grouped_lora_tpu(y[order], x[order], lora_a, lora_b, scales, group_starts,
                            group_adapters, block_tokens=block_tokens, interpret=interpret)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(num_tokens, dtype=jnp.int32))
    return out[inverse]


@functools.partial(jax.jit, static_argnames=("block_tokens", "interpret"))
def sgmv_tpu(y, x, lora_a, lora_b, segment_starts, segment_adapters, scales, *,
             block_tokens=SGMV_BLOCK_TOKENS, interpret=False):
    """Prefill LoRA on TPU over contiguous per-adapter segments; semantics of `sgmv_reference`.

    Segments are the kernel's groups as they are: no sort, no copy of x or y.
    """
    _check_shapes(y, x, lora_a, lora_b, scales)
    num_tokens = x.shape[0]
    num_adapters = lora_a.shape[0]
    if num_tokens == 0:
        return y
    # Clamp and make non-decreasing, so that a bad indptr can neither address rows outside x
    # nor overlap groups (the visit bound assumes disjoint, ordered groups).
    starts = lax.cummax(jnp.clip(segment_starts.astype(jnp.int32), 0, num_tokens))
    adapters = segment_adapters.astype(jnp.int32)
    adapters = jnp.where((adapters >= 0) & (adapters < num_adapters), adapters, -1)
    return _grouped_lora_tpu(y, x, lora_a, lora_b, scales, starts, adapters,
                             block_tokens=block_tokens, interpret=interpret)
