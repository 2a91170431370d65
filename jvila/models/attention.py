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
    else:
        k, v = gather_pages(k, cache_info.page_table), gather_pages(v, cache_info.page_table)
        kv_pos = jnp.arange(k.shape[2])
        visible = (kv_pos[None, None, :] <= mask_info.positions[:, :, None]) & (
            kv_pos[None, None, :] < cache_info.kv_lengths[:, None, None]
        )
    return _masked_softmax_attention(q, k, v, visible)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """[num_pages, page_size, h, d] pool × [batch, n] table → head-major [batch, h, n * page_size, d].

    Head-major because the score and value matmuls batch over (batch, head): XLA then fuses the
    gather and the transpose into one pass instead of copying K/V twice.
    """
    batch, n = page_table.shape
    # Table entries past a sequence's length may be garbage: clip so the gather stays in bounds;
    # the mask hides whatever they point to.
    gathered = pages[jnp.clip(page_table, 0, pages.shape[0] - 1)]  # [batch, n, page_size, h, d]
    heads, head_dim = pages.shape[2:]
    return gathered.transpose(0, 3, 1, 2, 4).reshape(batch, heads, n * pages.shape[1], head_dim)


_MASKED = -1e30


def _masked_softmax_attention(q, k, v, visible):
    """q [b, q_len, q_heads, d]; k, v head-major [b, kv_heads, kv_len, d]; visible [b, q_len, kv_len]."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    # Group query heads by their kv head instead of repeating K/V.
    # float32 throughout: this is the reference (XLA's CPU runtime has no bf16 x bf16 = f32 dot).
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", qg, k.astype(jnp.float32))
    # A finite mask value keeps fully masked rows (padding) free of NaN; they are zeroed below.
    scores = jnp.where(visible[:, None, None], scores * (head_dim**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v.astype(jnp.float32))
    out = jnp.where(visible.any(-1)[:, :, None, None, None], out, 0.0)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
