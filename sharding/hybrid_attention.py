"""2D sequence parallelism (LongVILA's MM-SP): Ulysses inside a node, ring across nodes.

The sequence is sharded over (ring, a2a) jointly, ring-major: device (i, j) holds piece j of ring
shard i. An all-to-all over the a2a axis gives each device ring shard i whole for 1/n_a2a of the
heads; a ring over the ring axis then attends it against every other ring shard; one all-to-all
returns the output. The all-to-all moves only inside the fast domain, the ring's point-to-point
steps cross the slow one (`sharding.mesh` keeps the a2a axis inside a node).

With the zigzag layout the batch is permuted for the ring's size alone: ring shard i is chunks
i and 2n_ring-1-i of the sequence, and the a2a pieces are slices of that shard, so the gathered
shard is in exactly the order the ring expects.
"""

from __future__ import annotations

from sharding.ring_attention import ring_attention
from sharding.ulysses_attention import ulysses_attention


def hybrid_attention(q, k, v, *, ring_axis, a2a_axis, causal=True, segment_ids=None, layout="contiguous",
                     sm_scale=None, implementation=None):
    """Attention output of this device's sequence piece; call inside `jax.shard_map`."""

    def ring(q, k, v, segment_ids):
        return ring_attention(q, k, v, axis_name=ring_axis, causal=causal, segment_ids=segment_ids, layout=layout,
                              sm_scale=sm_scale, implementation=implementation)

    return ulysses_attention(q, k, v, axis_name=a2a_axis, causal=causal, segment_ids=segment_ids,
                             sm_scale=sm_scale, implementation=implementation, inner=ring)
