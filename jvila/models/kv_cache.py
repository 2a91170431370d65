"""The paged KV cache: an explicit pytree passed into and returned from the functional core.

Its layout is the serving page pool's: per layer, K and V pools of
[num_pages, page_size, kv_heads, head_dim]; a page table [batch, pages_per_seq] naming each
sequence's pages in order; and `lengths` [batch], the tokens each sequence holds. Token t of
sequence b lives in page `page_table[b, t // page_size]` at slot `t % page_size`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jvila.config import LLMConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_pages: tuple[jax.Array, ...]  # per layer [num_pages, page_size, kv_heads, head_dim]
    v_pages: tuple[jax.Array, ...]
    page_table: jax.Array  # [batch, pages_per_seq] int32
    lengths: jax.Array  # [batch] int32

    @property
    def page_size(self) -> int:
        return self.k_pages[0].shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold."""
        return self.page_table.shape[1] * self.page_size


def contiguous_cache(cfg: LLMConfig, batch: int, max_tokens: int, *, page_size: int = 16, dtype=jnp.float32):
    """A cache where each sequence owns one run of pages (sequence b: pages b*n .. b*n + n - 1)."""
    pages_per_seq = -(-max_tokens // page_size)
    num_pages = batch * pages_per_seq
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k_pages=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v_pages=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        page_table=jnp.arange(num_pages, dtype=jnp.int32).reshape(batch, pages_per_seq),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def write_pages(pages: jax.Array, new: jax.Array, page_table: jax.Array, start: jax.Array, num_new: jax.Array):
    """Store new[b, t] (t < num_new[b]) at cache position start[b] + t of sequence b.

    new: [batch, chunk, kv_heads, head_dim]. Rows t >= num_new[b] are padding and are dropped.
    """
    batch, chunk = new.shape[:2]
    num_pages, page_size = pages.shape[:2]
    pos = start[:, None] + jnp.arange(chunk)[None, :]
    page_idx = jnp.clip(pos // page_size, 0, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table, page_idx, axis=1)
    valid = jnp.arange(chunk)[None, :] < num_new[:, None]
    # Out-of-range page ids make the scatter drop padding rows instead of clobbering a real page.
    page = jnp.where(valid, page, num_pages)
    return pages.at[page, pos % page_size].set(new.astype(pages.dtype), mode="drop")


def packed_layout(cu_q_lens: jax.Array, lengths: jax.Array, num_tokens: int):
    """Row and absolute position of each of `num_tokens` packed tokens.

    Row b's new tokens are packed tokens cu_q_lens[b] .. cu_q_lens[b+1] - 1 and continue its
    `lengths[b]` cached ones. Tokens past cu_q_lens[-1] are padding: row and position are
    clipped into range (never written: see `write_packed`).
    """
    rows = lengths.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right").astype(jnp.int32), rows - 1)
    position = lengths[slot] + token - cu_q_lens[slot]
    return slot, jnp.maximum(position, 0)


def write_packed(pages: jax.Array, new: jax.Array, page_table: jax.Array, token_slots: jax.Array,
                 positions: jax.Array, num_real: jax.Array):
    """Store packed new[t] (t < num_real) at cache position positions[t] of row token_slots[t].

    new: [T, kv_heads, head_dim]. Tokens t >= num_real are padding and are dropped.
    """
    num_pages, page_size = pages.shape[:2]
    page_idx = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = page_table[token_slots, page_idx]
    valid = jnp.arange(new.shape[0]) < num_real
    # Out-of-range page ids make the scatter drop padding tokens instead of clobbering a real page.
    page = jnp.where(valid, page, num_pages)
    return pages.at[page, positions % page_size].set(new.astype(pages.dtype), mode="drop")
