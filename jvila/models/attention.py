"""The attention interface the decoder is handed, and its dense reference implementation.

Every attention implementation (this dense reference, Pallas flash, ring/Ulysses, paged) is a
callable `attention(q, k, v, *, mask_info, cache_info) -> out` with

- q: [batch, q_len, q_heads, head_dim]
- without a cache (`cache_info is None`): k, v are [batch, q_len, kv_heads, head_dim], the same
  tokens as q; masking is causal by index and, if given, within equal segment ids.
- with a paged cache: k, v are one layer's page pools [num_pages, page_size, kv_heads, head_dim]
  that already hold the new tokens; sequence b's tokens are found through `page_table[b]`, the
  first `kv_lengths[b]` of them are valid, and query (b, i) sees cache position j iff
  j <= mask_info.positions[b, i].
- packed (`cache_info.cu_q_lens` set): q is [1, T, q_heads, head_dim], the new tokens of the
  page table's rows back to back (row b owns q[0, cu_q_lens[b]:cu_q_lens[b+1]]; tokens past
  cu_q_lens[-1] are padding and give zeros); token t belongs to row `token_slots[t]` and sees
  that row's cache positions j <= mask_info.positions[0, t]. This is the ragged kernel's form.

The model never branches on training versus serving: it only passes what it has.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskInfo:
    positions: jax.Array  # [batch, q_len] int32 absolute positions of the queries
    segment_ids: jax.Array | None = None  # [batch, q_len] int32; packed sequences (no cache only)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheInfo:
    page_table: jax.Array  # [batch, pages_per_seq] int32
    kv_lengths: jax.Array  # [batch] int32, tokens in the cache including the new ones
    # Packed tokens only (see the module docstring): [batch + 1] row offsets into the packed
    # tokens, and [T] the row of each packed token (padding tokens: any row).
    cu_q_lens: jax.Array | None = None
    token_slots: jax.Array | None = None

    @property
    def packed(self) -> bool:
        return self.cu_q_lens is not None


class Attention(Protocol):
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask_info: MaskInfo, cache_info: CacheInfo | None
    ) -> jax.Array: ...


def dense_attention(q, k, v, *, mask_info: MaskInfo, cache_info: CacheInfo | None):
    """Reference attention: materialises the score matrix, softmax in float32."""
    if cache_info is None:
        q_len = q.shape[1]
        visible = jnp.tril(jnp.ones((q_len, q_len), dtype=bool))[None]
        if mask_info.segment_ids is not None:
            seg = mask_info.segment_ids
            visible = visible & (seg[:, :, None] == seg[:, None, :])
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    elif cache_info.packed:
        return _packed_dense_attention(q, k, v, mask_info.positions, cache_info)
    else:
        k, v = gather_pages(k, cache_info.page_table), gather_pages(v, cache_info.page_table)
        kv_pos = jnp.arange(k.shape[2])
        visible = (kv_pos[None, None, :] <= mask_info.positions[:, :, None]) & (
            kv_pos[None, None, :] < cache_info.kv_lengths[:, None, None]
        )
    return _masked_softmax_attention(q, k, v, visible)


def gather_pages(pages: jax.Array, page_table: jax.Array, *, head_major: bool = True) -> jax.Array:
    """[num_pages, page_size, h, d] pool × [batch, n] table → head-major [batch, h, n * page_size, d]
    (or token-major [batch, n * page_size, h, d], a plain gather, with head_major=False).

    Head-major because the score and value matmuls batch over (batch, head): XLA then fuses the
    gather and the transpose into one pass instead of copying K/V twice.
    """
    batch, n = page_table.shape
    # Table entries past a sequence's length may be garbage: clip so the gather stays in bounds;
    # the mask hides whatever they point to.
    gathered = pages[jnp.clip(page_table, 0, pages.shape[0] - 1)]  # [batch, n, page_size, h, d]
    heads, head_dim = pages.shape[2:]
    if not head_major:
        return gathered.reshape(batch, n * pages.shape[1], heads, head_dim)
    return gathered.transpose(0, 3, 1, 2, 4).reshape(batch, heads, n * pages.shape[1], head_dim)


def packed_query_blocks(cu_q_lens: jax.Array, num_tokens: int):
    """Cuts each row's packed tokens into blocks of `block` tokens, none spanning two rows.

    The block size is static, the next power of two of the mean tokens per row, so a decode-only
    batch (one token per row) gets one block per row and a long prompt chunk a few wide ones.
    Returns (block, row of each block [n], index of each block's tokens [n, block], whether
    each is real [n, block]); n = min(T, T // block + rows) bounds the blocks any split needs.
    """
    rows = cu_q_lens.shape[0] - 1
    block = 1 << (max(-(-num_tokens // rows), 1) - 1).bit_length()
    num_blocks = min(num_tokens, num_tokens // block + rows)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks_of_row = -(-q_lens // block)
    block_end = jnp.cumsum(blocks_of_row)
    index = jnp.arange(num_blocks, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(block_end, index, side="right").astype(jnp.int32), rows - 1)
    first = (index - (block_end - blocks_of_row)[row]) * block  # offset of the block inside its row
    offset = first[:, None] + jnp.arange(block, dtype=jnp.int32)[None, :]
    live = (index < block_end[-1])[:, None] & (offset < q_lens[row][:, None])
    return block, row, jnp.where(live, cu_q_lens[row][:, None] + offset, 0), live


def _packed_dense_attention(q, k_pages, v_pages, positions, cache_info: CacheInfo):
    """Packed tokens, attended block by block: each block of one row's tokens against that row's
    pages, gathered once per block (never once per token, never every row for every token)."""
    num_tokens = q.shape[1]
    block, row, token_index, live = packed_query_blocks(cache_info.cu_q_lens, num_tokens)
    table = cache_info.page_table[row]
    if block == 1 and DECODE_FAST_PATH:
        return _decode_dense_attention(q, k_pages, v_pages, positions, cache_info, row, token_index[:, 0], live[:, 0])
    # Token-major here: measured ~8% faster per decode step than the head-major gather on
    # SmolLM2's shape (benchmarks/packed_extend_cpu.py), and no slower on prompt chunks.
    k, v = gather_pages(k_pages, table, head_major=False), gather_pages(v_pages, table, head_major=False)
    kv_pos = jnp.arange(k.shape[1])
    query_pos = positions[0][token_index]  # [blocks, block]
    visible = live[:, :, None] & (kv_pos[None, None, :] <= query_pos[:, :, None]) & (
        kv_pos[None, None, :] < cache_info.kv_lengths[row][:, None, None]
    )
    out = _masked_softmax_attention(q[0][token_index], k, v, visible, head_major=False)  # [blocks, block, h, d]
    # Every real token is exactly one (block, slot): scatter back; padding tokens stay zero.
    flat_index = jnp.where(live, token_index, num_tokens).reshape(-1)
    packed = jnp.zeros((num_tokens, *q.shape[2:]), q.dtype)
    return packed.at[flat_index].set(out.reshape(-1, *q.shape[2:]), mode="drop")[None]


# Decode-only steps take `_decode_dense_attention`; False forces the blocked path (benchmarks compare both).
DECODE_FAST_PATH = True


def _gather_rows(pages: jax.Array, table: jax.Array) -> jax.Array:
    """[num_pages, page_size, h, d] pool × [n, w] table → [n, w * page_size, h * d], each page one
    contiguous row copy (a plain row gather, which XLA's CPU backend runs as block copies)."""
    num_pages, page_size, heads, head_dim = pages.shape
    rows = pages.reshape(num_pages, page_size * heads * head_dim)[jnp.clip(table, 0, num_pages - 1)]
    return rows.reshape(table.shape[0], table.shape[1] * page_size, heads * head_dim)


def _decode_dense_attention(q, k_pages, v_pages, positions, cache_info: CacheInfo, row, token_index, live):
    """One query token per block (a decode-only step): token t of row `row[t]` against that row's pages.

    K and V stay token-major as gathered ([n, kv_len, kv_heads * head_dim]): the scores come from one
    matmul per token against a block-diagonal query ([kv_heads * head_dim, kv_heads * group], zero
    off its head's block), and the output from one matmul with V whose off-diagonal head blocks are
    dropped. That spends kv_heads times the (tiny, one-query) attention FLOPs to avoid transposing
    the gathered K/V into head-major order, which cost most of a decode step's attention time on
    CPU (a step of SmolLM2-135M at batch 8: about 8% less CPU time in all). The zero blocks add
    exact zeros; only the summation order may differ from the blocked path's (float rounding).
    """
    num_tokens, q_heads, head_dim = q.shape[1:]
    kv_heads = k_pages.shape[2]
    group = q_heads // kv_heads
    n = token_index.shape[0]
    k = _gather_rows(k_pages, cache_info.page_table[row]).astype(jnp.float32)
    v = _gather_rows(v_pages, cache_info.page_table[row]).astype(jnp.float32)
    kv_len = k.shape[1]
    eye = jnp.eye(kv_heads, dtype=jnp.float32)
    qg = q[0][token_index].reshape(n, kv_heads, group, head_dim).astype(jnp.float32)
    q_block = jnp.einsum("nhgd,hi->nhdig", qg, eye).reshape(n, kv_heads * head_dim, kv_heads * group)
    scores = jnp.einsum("nkc,ncj->nkj", k, q_block)  # [n, kv_len, kv_heads * group]
    kv_pos = jnp.arange(kv_len)
    visible = live[:, None] & (kv_pos[None, :] <= positions[0][token_index][:, None]) & (
        kv_pos[None, :] < cache_info.kv_lengths[row][:, None])
    scores = jnp.where(visible[:, :, None], scores * (head_dim**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.einsum("nkj,nkc->njc", probs, v).reshape(n, kv_heads, group, kv_heads, head_dim)
    out = jnp.einsum("nhgid,hi->nhgd", out, eye)  # each query head's own kv head block
    out = jnp.where(live[:, None, None, None], out, 0.0).reshape(n, q_heads, head_dim).astype(q.dtype)
    flat_index = jnp.where(live, token_index, num_tokens)
    packed = jnp.zeros((num_tokens, q_heads, head_dim), q.dtype)
    return packed.at[flat_index].set(out, mode="drop")[None]


_MASKED = -1e30


def _masked_softmax_attention(q, k, v, visible, *, head_major: bool = True):
    """q [b, q_len, q_heads, d]; k, v head-major [b, kv_heads, kv_len, d] (or token-major
    [b, kv_len, kv_heads, d]); visible [b, q_len, kv_len]."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[1] if head_major else k.shape[2]
    kv = "bhkd" if head_major else "bkhd"
    group = q_heads // kv_heads
    # Group query heads by their kv head instead of repeating K/V.
    # float32 throughout: this is the reference (XLA's CPU runtime has no bf16 x bf16 = f32 dot).
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum(f"bqhgd,{kv}->bhgqk", qg, k.astype(jnp.float32))
    # A finite mask value keeps fully masked rows (padding) free of NaN; they are zeroed below.
    scores = jnp.where(visible[:, None, None], scores * (head_dim**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(f"bhgqk,{kv}->bqhgd", probs, v.astype(jnp.float32))
    out = jnp.where(visible.any(-1)[:, :, None, None, None], out, 0.0)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
