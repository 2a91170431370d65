"""Paged decode attention as a Mosaic TPU kernel (semantics: `paged_attention_reference`).

Layout on the chip:
  - the page table and lengths are scalar-prefetch operands, so they sit in SMEM and the
    kernel can read page ids as scalars to address DMAs (Mosaic cannot gather with vectors);
  - the K/V pools stay in HBM (`pl.ANY`); each program copies only the pages its sequence
    owns, one page per DMA, into a two-slot VMEM buffer: while block b is computed, the pages
    of block b + 1 are already in flight;
  - the grid is (sequence, kv head); a program holds all query heads of its kv head, so K/V are
    read once per kv head (GQA without repetition), and runs an fp32 online softmax over its
    blocks of `pages_per_block` pages.

Page-table entries past a sequence's length are never read as DMA addresses, and slots past the
length (stale buffer contents, NaN tails of the last page) are masked out of the logits and
zeroed in V, because `0 * NaN` would otherwise reach the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_tpu import LANES, CompilerParams, interpret_params

# Finite stand-in for -inf, so exp(m_prev - m_next) never sees inf - inf before any live key.
_MASK_VALUE = -1e30
# Tokens per K/V block by default: 512 tokens of d128 bf16 is 128 KiB per buffer; K and V,
# two slots each, take 512 KiB of VMEM, far under the scoped limit of every TPU generation.
_DEFAULT_TOKENS_PER_BLOCK = 512

def heads_per_window(kv_heads, head_dim):
    """How many kv heads one program takes: the fewest whose columns of a page row form a
    DMA-legal window (HBM is tiled (8, 128), so a multiple of 128 lanes), else all of them (the
    whole row is legal)."""
    for packing in range(1, kv_heads + 1):
        if kv_heads % packing == 0 and (packing * head_dim) % LANES == 0:
            return packing
    return kv_heads


def pack_heads(x, packing):
    """[..., kv_heads, rows, d] -> block-diagonal [..., kv_heads / P, P * rows, P * d].

    Row block p of a window holds the queries of its p-th kv head in column block p and zeros
    elsewhere, so against the window's packed K columns each row scores only its own head: the
    kernels run unchanged with head_dim P * d, at P times the MXU work (decode is
    bandwidth-bound; for head_dim 64, P = 2)."""
    if packing == 1:
        return x
    *lead, kv_heads, rows, head_dim = x.shape
    x = x.reshape(*lead, kv_heads // packing, packing, rows, 1, head_dim)
    diagonal = jnp.eye(packing, dtype=bool)[:, None, :, None]  # [P, 1, P, 1]
    x = jnp.where(diagonal, x, jnp.zeros((), x.dtype))  # where, not *: 0 * NaN padding is NaN
    return x.reshape(*lead, kv_heads // packing, packing * rows, packing * head_dim)


def unpack_heads(x, packing):
    """Inverse of `pack_heads` on the outputs: keep each row block's own column block."""
    if packing == 1:
        return x
    *lead, windows, packed_rows, packed_dim = x.shape
    x = x.reshape(*lead, windows, packing, packed_rows // packing, packing, packed_dim // packing)
    x = jnp.diagonal(x, axis1=-4, axis2=-2)  # [..., windows, rows, d, P]
    return jnp.moveaxis(x, -1, -3).reshape(*lead, windows * packing, packed_rows // packing,
                                           packed_dim // packing)


def _when(condition, actions):
    """Runs the side-effecting `actions` (DMA starts or waits) only where `condition` holds."""
    @pl.when(condition)
    def _():
        for action in actions:
            action()


@dataclasses.dataclass(frozen=True)
class PageDMAs:
    """Per-page DMAs of one sequence's pages, one kv head's column window, into a two-slot buffer.

    Block b of the sequence is pages [b * P, (b + 1) * P) of its table row (P = pages per
    buffer slot); only pages below `used_pages` are ever addressed, since entries past them may
    be garbage or out of range. `start` and `wait` rebuild the same descriptors, so a wait
    matches its start by construction.
    """

    table_ref: object  # flat page table in SMEM
    table_offset: object  # index of the sequence's first entry in it
    pages_per_seq: int
    used_pages: object
    k_hbm: object  # pools [pages, page_size, kv_heads * head_dim] in HBM
    v_hbm: object
    k_buf: object  # [2, P, page_size, head_dim] in VMEM
    v_buf: object
    sems: object  # DMA semaphores [2 (K, V), 2 (slot)]
    kv_head: object  # which column window of a pool row (after `pack_heads`)

    def _window(self, pool, page_id):
        head_dim = self.k_buf.shape[-1]
        if head_dim == pool.shape[-1]:
            # The whole row: sliced by a traced (if always zero) lane offset, a window narrower
            # than a multiple of 128 lanes would fail Mosaic's tile-alignment check.
            return pool.at[page_id]
        # A lane-aligned column window of each page row (a strided DMA), so the VMEM copy is
        # a dense [page_size, d].
        column = pl.multiple_of(self.kv_head * head_dim, head_dim)
        return pool.at[page_id].at[:, pl.ds(column, head_dim)]

    def copies(self, block, slot):
        """(live?, K copy, V copy) for every page of `block`."""
        pages_per_block = self.k_buf.shape[1]
        copies = []
        for i in range(pages_per_block):
            page_index = block * pages_per_block + i
            live = page_index < self.used_pages
            # Substitute page 0 for dead entries; they are only ever started or waited on
            # under `live`, so page 0 is never actually copied for them.
            entry = self.table_offset + jnp.minimum(page_index, self.pages_per_seq - 1)
            page_id = jnp.where(live, self.table_ref[entry], 0)
            k_copy = pltpu.make_async_copy(self._window(self.k_hbm, page_id),
                                           self.k_buf.at[slot, i], self.sems.at[0, slot])
            v_copy = pltpu.make_async_copy(self._window(self.v_hbm, page_id),
                                           self.v_buf.at[slot, i], self.sems.at[1, slot])
            copies.append((live, k_copy, v_copy))
        return copies

    def start(self, block, slot):
        for live, *copies in self.copies(block, slot):
            _when(live, [copy.start for copy in copies])

    def wait(self, block, slot):
        for live, *copies in self.copies(block, slot):
            _when(live, [copy.wait for copy in copies])


def online_softmax_init(rows, head_dim):
    """(accumulator, running max, running sum) before any K/V block, all fp32."""
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows, 1), _MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def online_softmax_step(q, k_pages, v_pages, visible, first_key, key_end, carry, *, sm_scale):
    """Fold one K/V block (`[pages, page_size, d]` as the page DMAs left it) into `carry`.

    `visible` [rows, tokens] masks the logits; V rows at or past `key_end` are zeroed, because
    stale buffer slots and NaN page tails would otherwise reach the output as 0 * NaN.
    """
    acc, m_prev, l_prev = carry
    num_pages, page_size, head_dim = k_pages.shape
    # [pages, page_size, d] -> [tokens, d]: merges leading dims only (page_size is a multiple
    # of the sublane tile on the sizes a TPU is meant to run).
    k = k_pages.reshape(num_pages * page_size, head_dim)
    v = v_pages.reshape(num_pages * page_size, head_dim)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * sm_scale
    logits = jnp.where(visible, logits, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(logits - m_next), 0.0)
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + probs.sum(axis=1, keepdims=True)
    v_pos = first_key + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(v_pos < key_end, v, jnp.zeros((), v.dtype))
    pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    return correction * acc + pv, m_next, l_next


def online_softmax_result(carry):
    """The attention output from the final carry; rows that saw no key give zeros."""
    acc, _, l = carry
    return acc / jnp.where(l == 0.0, 1.0, l)


def attend_pages(q, key_end, pools, *, table_ref, table_offset, pages_per_seq, kv_head, sm_scale,
                 row_positions=None):
    """fp32 attention of q [rows, d] over one sequence's keys [0, key_end), read page by page.

    `pools` = (k_hbm, v_hbm, k_buf, v_buf, sems) as the kernels receive them. Only the pages
    holding keys below `key_end` are copied, block by block into the two-slot buffer, the next
    block in flight while one is computed. `row_positions` = (first_pos, block_q) adds a causal
    bound: row r is the query at position first_pos + r % block_q (ragged tiles); None lets
    every row see every key below `key_end` (decode).
    """
    k_hbm, v_hbm, k_buf, v_buf, sems = pools
    pages_per_block, page_size, head_dim = k_buf.shape[1:]
    rows = q.shape[0]
    # lax.div/rem (truncating) rather than // and %: the operands are >= 0, and the floor
    # variants add sign fix-ups whose lowering asks for the chip generation.
    used_pages = lax.div(key_end + page_size - 1, page_size)
    num_blocks = lax.div(used_pages + pages_per_block - 1, pages_per_block)
    tokens_per_block = pages_per_block * page_size
    pages = PageDMAs(table_ref, table_offset, pages_per_seq, used_pages, k_hbm, v_hbm, k_buf, v_buf,
                     sems, kv_head)

    @pl.when(num_blocks > 0)
    def _():
        pages.start(0, 0)

    if row_positions is not None:
        first_pos, block_q = row_positions
        row_pos = first_pos + lax.rem(lax.broadcasted_iota(jnp.int32, (rows, tokens_per_block), 0),
                                      block_q)

    def body(block, carry):
        slot = lax.rem(block, 2)

        @pl.when(block + 1 < num_blocks)
        def _():
            pages.start(block + 1, 1 - slot)

        pages.wait(block, slot)
        first_key = block * tokens_per_block
        key_pos = first_key + lax.broadcasted_iota(jnp.int32, (rows, tokens_per_block), 1)
        visible = key_pos < key_end
        if row_positions is not None:
            visible &= key_pos <= row_pos
        return online_softmax_step(q, k_buf[slot], v_buf[slot], visible, first_key, key_end, carry,
                                   sm_scale=sm_scale)

    carry = lax.fori_loop(0, num_blocks, body, online_softmax_init(rows, head_dim))
    return online_softmax_result(carry)


def _decode_kernel(table_ref, lengths_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, *,
                   sm_scale, pages_per_seq):
    seq = pl.program_id(0)
    out = attend_pages(q_ref[...], lengths_ref[seq], (k_hbm, v_hbm, k_buf, v_buf, sems),
                       table_ref=table_ref, table_offset=seq * pages_per_seq,
                       pages_per_seq=pages_per_seq, kv_head=pl.program_id(1), sm_scale=sm_scale)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block", "interpret"))
def paged_attention_tpu(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None,
                        pages_per_block=None, interpret=False):
    """Decode attention over paged K/V on TPU; `interpret=True` runs the TPU interpreter (CPU).

    `pages_per_block` pages form one K/V block (default: ~512 tokens, capped at the table width).
    """
    num_seqs, q_heads, head_dim = q.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    num_pages, page_size, kv_heads, kv_dim = k_pages.shape
    if kv_dim != head_dim or q_heads % kv_heads:
        raise ValueError(f"q {q.shape} does not fit the cache {k_pages.shape}")
    pages_per_seq = page_table.shape[1]
    if page_table.shape[0] != num_seqs or lengths.shape != (num_seqs,):
        raise ValueError("page_table and lengths must have one row per query")
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if pages_per_block is None:
        pages_per_block = max(1, min(pages_per_seq, _DEFAULT_TOKENS_PER_BLOCK // page_size))
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")

    # 2-D SMEM arrays are padded to 128-word rows; a flat table wastes nothing.
    table = page_table.astype(jnp.int32).reshape(-1)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, pages_per_seq * page_size)
    # Free reshapes (trailing dims are contiguous): a kv head becomes a column window.
    k_flat = k_pages.reshape(num_pages, page_size, kv_heads * head_dim)
    v_flat = v_pages.reshape(num_pages, page_size, kv_heads * head_dim)
    packing = heads_per_window(kv_heads, head_dim)
    qg = pack_heads(q.reshape(num_seqs, kv_heads, group, head_dim), packing)
    kv_heads, group, head_dim = kv_heads // packing, group * packing, head_dim * packing

    kernel = functools.partial(_decode_kernel, sm_scale=scale, pages_per_seq=pages_per_seq)
    # q/out blocks are [group, d]: group (1-8 here) is the full dim, which Mosaic accepts and
    # pads to a sublane tile; d = 128 fills the lanes.
    row_spec = pl.BlockSpec((None, None, group, head_dim), lambda s, h, *_: (s, h, 0, 0))
    pool_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, pages_per_block, page_size, head_dim), k_pages.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_seqs, kv_heads),
        in_specs=[row_spec, pool_spec, pool_spec],
        out_specs=row_spec,
        scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2))],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params() if interpret else False,
        name="paged_decode_attention_tpu",
    )(table, lengths, qg, k_flat, v_flat)
    return unpack_heads(out, packing).reshape(q.shape)
