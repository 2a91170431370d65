"""Sequence-parallel prefill: a long prompt's forward split over the mesh's sequence axes, filling
the paged cache, after which decoding proceeds as usual (one token per step, any attention).

The forward is the cache-free training forward with sequence-sharded attention (`KernelAttention`
on the mesh: ring, Ulysses or 2D). Each layer's K/V (after RoPE) are taken from the attention
call itself — the model hands them to the attention callable — and written into the pages, so the
model needs no prefill-specific path. The cache is assumed empty: prompts start at position 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jvila.models.kernel_attention import KernelAttention
from jvila.models.kv_cache import KVCache, write_pages
from sharding.load_balance import from_zigzag, to_zigzag
from sharding.mesh import A2A_AXIS, RING_AXIS


class _KeepKeysValues:
    """An attention that also keeps every layer's k and v (trace-time list, same jit trace)."""

    def __init__(self, inner):
        self.inner, self.keys_values = inner, []

    def __call__(self, q, k, v, *, mask_info, cache_info):
        self.keys_values.append((k, v))
        return self.inner(q, k, v, mask_info=mask_info, cache_info=cache_info)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "layout", "implementation"),
                   donate_argnames=("cache",))
def sp_prefill(graphdef, state, tokens, lengths, cache: KVCache, *, mesh, layout="contiguous",
               implementation=None):
    """Prefill prompts tokens [batch, seq] (row b: its first lengths[b] are real) into an empty cache.

    seq must split over the mesh's sequence shards (twice that for the zigzag layout). Returns the
    float32 logits at each row's last prompt token [batch, vocab] and the cache holding the prompts.
    """
    model = nnx.merge(graphdef, state)
    if len(cache.k_pages) != len(model.layers):
        raise ValueError(f"the cache has {len(cache.k_pages)} layers, the model {len(model.layers)}")
    if tokens.shape[1] > cache.capacity:
        raise ValueError(f"prompts of {tokens.shape[1]} tokens do not fit a cache of {cache.capacity} per row")
    ring, a2a = mesh.shape.get(RING_AXIS, 1), mesh.shape.get(A2A_AXIS, 1)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    order = (lambda x: to_zigzag(x, ring, shard_multiple=a2a)) if layout == "zigzag" else (lambda x: x)
    restore = (lambda x: from_zigzag(x, ring, shard_multiple=a2a)) if layout == "zigzag" else (lambda x: x)
    attention = _KeepKeysValues(KernelAttention(implementation, mesh=mesh, sequence_layout=layout))
    hidden, _ = model(model.embed_tokens(order(tokens)), positions=order(positions), attention=attention)
    start = jnp.zeros_like(lengths)
    k_pages = tuple(write_pages(pages, restore(k), cache.page_table, start, lengths)
                    for pages, (k, _) in zip(cache.k_pages, attention.keys_values))
    v_pages = tuple(write_pages(pages, restore(v), cache.page_table, start, lengths)
                    for pages, (_, v) in zip(cache.v_pages, attention.keys_values))
    last = jnp.take_along_axis(restore(hidden), jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), KVCache(k_pages, v_pages, cache.page_table, lengths.astype(jnp.int32))
