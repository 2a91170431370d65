"""Ulysses (DeepSpeed) sequence parallelism: all-to-all from sequence shards to head shards.

Inside `jax.shard_map`, each of the n devices of `axis_name` holds a sequence shard with all heads.
One all-to-all per tensor gives each device the whole sequence for 1/n of the heads; attention
runs locally (`inner`, flash by default); one all-to-all returns the output to sequence shards.
Each device sends 3 of its 4 input shards' worth (q, k, v) plus the output: 4·(n-1)/n of a shard
per direction, independent of the ring's n steps (LongVILA's reason to keep this axis in a node).

Heads must split n ways. K/V with fewer heads than n (GQA, MQA) are repeated up to n when n is a
multiple of their count, so device j gets a copy of the kv head its query heads use; anything
else is an error naming the fix. Autodiff gives the backward: an all-to-all transposes to one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import flash_attention_with_lse


def check_heads(q_heads: int, kv_heads: int, ways: int, axis_name: str) -> int:
    """How many times each kv head must be repeated for an n-way head split; ValueError if none works."""
    if q_heads % ways:
        raise ValueError(
            f"{q_heads} query heads per device cannot be split {ways} ways over mesh axis {axis_name!r}: "
            f"make {axis_name!r} a divisor of the head count (after any tensor split) and put the rest of "
            "the sequence parallelism on the ring axis 'sequence'")
    if kv_heads % ways == 0:
        return 1
    if ways % kv_heads == 0:
        return ways // kv_heads
    raise ValueError(
        f"{kv_heads} kv heads per device neither divide nor are divided by the {ways}-way split over "
        f"{axis_name!r}: choose a size for {axis_name!r} that is a multiple or a divisor of the kv head count, "
        "or use the ring axis 'sequence'")


def _to_heads(x, axis_name):
    """[b, len/n, h, d] sequence shard → [b, len, h/n, d] head shard."""
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _to_sequence(x, axis_name):
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q, k, v, *, axis_name, causal=True, segment_ids=None, sm_scale=None, implementation=None,
                      inner=None):
    """Attention output of this device's sequence shard (same layout as q).

    `inner(q, k, v, segment_ids)` -> (out, lse) attends the gathered sequence of the local heads;
    by default one flash call (`hybrid_attention` passes a ring over another axis).
    """
    ways = lax.axis_size(axis_name)
    repeat = check_heads(q.shape[2], k.shape[2], ways, axis_name)
    if repeat > 1:
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    q, k, v = (_to_heads(x, axis_name) for x in (q, k, v))
    if segment_ids is not None:
        segment_ids = lax.all_gather(jnp.asarray(segment_ids, jnp.int32), axis_name, axis=1, tiled=True)
    if inner is None:
        out, _ = flash_attention_with_lse(q, k, v, causal=causal, sm_scale=sm_scale, q_segment_ids=segment_ids,
                                          kv_segment_ids=segment_ids, implementation=implementation)
    else:
        out, _ = inner(q, k, v, segment_ids)
    return _to_sequence(out, axis_name)
