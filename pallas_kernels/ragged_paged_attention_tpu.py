"""Ragged paged attention (chunked prefill + decode in one call) as a Mosaic TPU kernel.

Semantics: `ragged_paged_attention_reference` (q packs every sequence's new tokens back to back,
`cu_q_lens` offsets; sequence s's queries are the last q_len_s of its kv_lengths[s] tokens,
causal among themselves; rows past cu_q_lens[-1] give zeros).

Layout on the chip:
  - a schedule built with jnp outside the kernel cuts each sequence's query tokens into blocks
    of `block_q` tokens, none spanning two sequences (`blocks_over_segments`, as the GPU kernel
    does). Per block it records the sequence, the live rows, the kv position of the first row
    and the causal key bound (keys the last live row may see, never past the stored tokens).
    These arrays and the flattened page table are scalar-prefetch operands in SMEM: the
    kernel reads page ids as scalars to address DMAs (Mosaic cannot gather with vectors);
  - the query blocks are gathered (by XLA) into tiles [kv head, group * block_q, d], head
    major, so one tile holds every query head of one kv head (GQA without repeating K/V) as a
    plain 2-D matrix for the MXU; Pallas pipelines these tiles in and out;
  - the grid is (query block, kv head); the K/V pools stay in HBM (`pl.ANY`) and each program
    copies only the pages below its causal bound, one page per DMA, into a two-slot VMEM buffer
    shared with the decode kernel (`attend_pages`): while a K/V block is computed, the next one is
    in flight. A decode row therefore reads its whole context, a prefill block only the prefix
    its last query sees;
  - an fp32 online softmax runs over K/V blocks of `pages_per_block` pages.

Slots past the causal bound (stale buffer contents, NaN tails of the last page) are masked out
of the logits and zeroed in V, because `0 * NaN` would otherwise reach the output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._triton import blocks_over_segments, next_pow2
from pallas_kernels._mosaic_tpu import CompilerParams, interpret_params
from pallas_kernels.paged_attention_tpu import (
    _DEFAULT_TOKENS_PER_BLOCK,
    attend_pages,
    heads_per_window,
    pack_heads,
    unpack_heads,
)

# Rows (query heads x tokens) of a q tile by default: 512 x d128 keeps the MXU fed on prefill,
# and the [512, 512] fp32 logits of one K/V block (1 MiB) stay well inside scoped VMEM.
_DEFAULT_TILE_ROWS = 512


# ----------------------------------------------------------------------------- schedule


def _schedule(cu_q_lens, kv_lengths, num_tokens, block_q, capacity):
    """Query blocks (one sequence each) and what the kernel needs to know about each.

    The block count is static: sum_s ceil(q_len_s / B) <= num_tokens // B + num_seqs, and each
    used block holds at least one token. Unused blocks get rows = key_end = 0 (no work).
    """
    num_seqs = kv_lengths.shape[0]
    num_blocks = max(1, min(num_tokens, num_tokens // block_q + num_seqs))
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    seq, used, within, block_begin = blocks_over_segments(q_lens, block_q, num_blocks)
    rows = jnp.where(used, jnp.clip(q_lens[seq] - within, 0, block_q), 0)
    # Positions come from the unclipped length (as in the reference); keys stop at the table.
    first_pos = kv_lengths[seq] - q_lens[seq] + within
    stored = jnp.clip(kv_lengths[seq], 0, capacity)
    key_end = jnp.where(used, jnp.clip(first_pos + rows, 0, stored), 0)
    return dict(seq=seq, rows=rows, first_pos=first_pos, key_end=key_end,
                first_row=cu_q_lens[seq] + within, block_begin=block_begin)


def _gather_tiles(q, sched, block_q, kv_heads):
    """q [tokens, q_heads, d] -> tiles [blocks, kv_heads, group * block_q, d]; dead rows zero."""
    num_tokens, q_heads, head_dim = q.shape
    row = jnp.arange(block_q, dtype=jnp.int32)
    live = row[None, :] < sched["rows"][:, None]
    index = jnp.where(live, sched["first_row"][:, None] + row[None, :], 0)
    tiles = jnp.where(live[:, :, None, None], q[index], jnp.zeros((), q.dtype))
    num_blocks = tiles.shape[0]
    tiles = tiles.reshape(num_blocks, block_q, kv_heads, q_heads // kv_heads, head_dim)
    return tiles.transpose(0, 2, 3, 1, 4).reshape(num_blocks, kv_heads, -1, head_dim)


def _scatter_tiles(tiles, sched, cu_q_lens, block_q, q_shape):
    """Inverse of `_gather_tiles` for the live tokens; rows past cu_q_lens[-1] are zero."""
    num_tokens, q_heads, head_dim = q_shape
    num_blocks, kv_heads = tiles.shape[:2]
    tiles = tiles.reshape(num_blocks, kv_heads, q_heads // kv_heads, block_q, head_dim)
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], token, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, cu_q_lens.shape[0] - 2)
    offset = token - cu_q_lens[seq]
    block = jnp.clip(sched["block_begin"][seq] + offset // block_q, 0, num_blocks - 1)
    out = tiles[block, :, :, offset % block_q]  # [tokens, kv_heads, group, d]
    live = (token < cu_q_lens[-1])[:, None, None, None]
    return jnp.where(live, out, jnp.zeros((), out.dtype)).reshape(q_shape)


# ----------------------------------------------------------------------------- kernel


def _ragged_kernel(table_ref, seq_ref, rows_ref, first_pos_ref, key_end_ref,
                   q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, *,
                   sm_scale, block_q, pages_per_seq):
    block = pl.program_id(0)
    seq = seq_ref[block]
    # Row r of the tile is query head r // block_q of the group, token r % block_q of the block.
    # Dead rows (token >= rows) hold zeros and compute finite values the scatter drops.
    out = attend_pages(q_ref[...], key_end_ref[block], (k_hbm, v_hbm, k_buf, v_buf, sems),
                       table_ref=table_ref, table_offset=seq * pages_per_seq,
                       pages_per_seq=pages_per_seq, kv_head=pl.program_id(1), sm_scale=sm_scale,
                       row_positions=(first_pos_ref[block], block_q))
    o_ref[...] = out.astype(o_ref.dtype)


# ----------------------------------------------------------------------------- entry point


def _pick_block_q(num_tokens, num_seqs, group, block_q):
    if block_q is not None:
        if block_q < 1:
            raise ValueError(f"block_q must be >= 1, got {block_q}")
        return block_q
    # Blocks sized to the mean query length: decode-heavy batches get small tiles (little
    # padding), prefill chunks up to _DEFAULT_TILE_ROWS rows of query heads x tokens.
    mean_q = -(-num_tokens // max(num_seqs, 1))
    return max(1, min(next_pow2(mean_q), _DEFAULT_TILE_ROWS // group))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "pages_per_block",
                                             "interpret"))
def ragged_paged_attention_tpu(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *,
                               sm_scale=None, block_q=None, pages_per_block=None,
                               interpret=False):
    """Ragged paged attention on TPU; `interpret=True` runs the TPU interpreter (CPU).

    `block_q` query tokens per tile (default: the mean query length rounded up to a power of
    two, at most 512 // group); `pages_per_block` pages per K/V block (default ~512 tokens).
    """
    num_tokens, q_heads, head_dim = q.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    num_pages, page_size, kv_heads, kv_dim = k_pages.shape
    if kv_dim != head_dim or q_heads % kv_heads:
        raise ValueError(f"q {q.shape} does not fit the cache {k_pages.shape}")
    num_seqs, pages_per_seq = page_table.shape
    if kv_lengths.shape != (num_seqs,) or cu_q_lens.shape != (num_seqs + 1,):
        raise ValueError("page_table needs num_seqs rows and cu_q_lens num_seqs + 1 entries")
    if num_tokens == 0:
        return q
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    block_q = _pick_block_q(num_tokens, num_seqs, group, block_q)
    if pages_per_block is None:
        pages_per_block = max(1, min(pages_per_seq, _DEFAULT_TOKENS_PER_BLOCK // page_size))
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")

    cu_q_lens = cu_q_lens.astype(jnp.int32)
    sched = _schedule(cu_q_lens, kv_lengths.astype(jnp.int32), num_tokens, block_q,
                      pages_per_seq * page_size)
    # Row p * group * block_q + r of a packed tile is row r of head p: still token r % block_q.
    packing = heads_per_window(kv_heads, head_dim)
    tiles = pack_heads(_gather_tiles(q, sched, block_q, kv_heads), packing)
    num_blocks = tiles.shape[0]
    # 2-D SMEM arrays are padded to 128-word rows; a flat table wastes nothing.
    table = page_table.astype(jnp.int32).reshape(-1)
    # Free reshapes (trailing dims are contiguous): a kv head becomes a column window.
    k_flat = k_pages.reshape(num_pages, page_size, kv_heads * head_dim)
    v_flat = v_pages.reshape(num_pages, page_size, kv_heads * head_dim)
    kv_heads, group, head_dim = kv_heads // packing, group * packing, head_dim * packing

    kernel = functools.partial(_ragged_kernel, sm_scale=scale, block_q=block_q,
                               pages_per_seq=pages_per_seq)
    # q/out tiles are the full [group * block_q, d] trailing dims, which Mosaic accepts for any
    # row count (padded to a sublane tile); d = 128 fills the lanes.
    tile_spec = pl.BlockSpec((None, None, group * block_q, head_dim), lambda b, h, *_: (b, h, 0, 0))
    pool_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, pages_per_block, page_size, head_dim), k_pages.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_blocks, kv_heads),
        in_specs=[tile_spec, pool_spec, pool_spec],
        out_specs=tile_spec,
        scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2))],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(tiles.shape, q.dtype),
        compiler_params=CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params() if interpret else False,
        name="ragged_paged_attention_tpu",
    )(table, sched["seq"], sched["rows"], sched["first_pos"], sched["key_end"],
      tiles, k_flat, v_flat)
    return _scatter_tiles(unpack_heads(out, packing), sched, cu_q_lens, block_q, q.shape)
