"""2D sequence parallelism (LongVILA's MM-SP): Ulysses inside a node, ring across nodes.

The sequence is sharded over (ring, a2a) jointly, ring-major: device (i, j) holds piece j of ring
shard i. An all-to-all over the a2a axis gives each device ring shard i whole for 1/n_a2a of the
heads; a ring over the ring axis then attends it against every other ring shard; one all-to-all
returns the output. The all-to-all moves only inside the fast domain, the ring's point-to-point
steps cross the slow one (`sharding.mesh` keeps the a2a axis inside a node).

With the zigzag layout the batch is permuted for the ring's size alone: ring shard i is chunks
i and 2n_ring-1-i of the sequence, and the a2a pieces are slices of that shard, so the gathered
shard is in exactly the order the ring expects. Layout "lightseq" keeps contiguous shards and
runs LightSeq's balanced schedule as the ring stage (`sharding.lightseq_attention`).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from pallas_kernels.ring_attention_tpu import ring_attention_tpu
from sharding.lightseq_attention import lightseq_attention
from sharding.mesh import A2A_AXIS, RING_AXIS
from sharding.ring_attention import ring_attention
from sharding.ulysses_attention import ulysses_attention


def _fused_tpu(implementation) -> bool:
    if implementation is None:
        return jax.default_backend() == "tpu"
    return implementation in ("pallas_tpu", "pallas_tpu_interpret")


def ring_stage(q, k, v, *, axis_name, causal, segment_ids, layout, sm_scale=None, implementation=None):
    """(out, lse) over the ring axis. On a TPU (implementation None there, or "pallas_tpu[_interpret]")
    with contiguous shards and no segment ids: the fused ring kernel. Otherwise LightSeq's schedule
    for layout "lightseq" with a causal mask (without a mask there is no imbalance to fix, so the
    plain ring), else the ring in the given layout."""
    if layout in ("contiguous", "lightseq") and segment_ids is None and _fused_tpu(implementation):
        # One Mosaic kernel: K/V travel by remote DMA while the block computes (forward); its
        # backward is the unfused ring. Its own causal work balancing is the contiguous ring's.
        interpret = implementation == "pallas_tpu_interpret"
        return ring_attention_tpu(q, k, v, axis_name=axis_name, causal=causal, sm_scale=sm_scale,
                                  interpret=interpret)
    if layout == "lightseq":
        if causal:
            return lightseq_attention(q, k, v, axis_name=axis_name, segment_ids=segment_ids, sm_scale=sm_scale,
                                      implementation=implementation)
        layout = "contiguous"
    return ring_attention(q, k, v, axis_name=axis_name, causal=causal, segment_ids=segment_ids, layout=layout,
                          sm_scale=sm_scale, implementation=implementation)


def hybrid_attention(q, k, v, *, ring_axis, a2a_axis, causal=True, segment_ids=None, layout="contiguous",
                     sm_scale=None, implementation=None):
    """Attention output of this device's sequence piece; call inside `jax.shard_map`."""

    def ring(q, k, v, segment_ids):
        return ring_stage(q, k, v, axis_name=ring_axis, causal=causal, segment_ids=segment_ids, layout=layout,
                          sm_scale=sm_scale, implementation=implementation)

    return ulysses_attention(q, k, v, axis_name=a2a_axis, causal=causal, segment_ids=segment_ids,
                             sm_scale=sm_scale, implementation=implementation, inner=ring)


SEQUENCE_LAYOUTS = ("contiguous", "zigzag", "lightseq")


def sequence_axes(mesh) -> tuple[str, ...]:
    """The sequence axes of `mesh` that split anything, ring-major (the rule table's order)."""
    return tuple(axis for axis in (RING_AXIS, A2A_AXIS) if mesh.shape.get(axis, 1) > 1)


def sequence_parallel_attention(q, k, v, segment_ids, *, mesh, rows, heads, causal=True, layout="contiguous",
                                implementation=None):
    """Cache-free attention of whole arrays with the sequence sharded over the mesh's sequence axes.

    The strategy follows the mesh: a ring axis alone gives ring attention, an all-to-all axis alone
    Ulysses, both the 2D hybrid. `rows` and `heads` are the mesh axes (or None) that batch rows and
    heads split over as well. Returns the output in q's layout.
    """
    if layout not in SEQUENCE_LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {SEQUENCE_LAYOUTS}")
    axes = sequence_axes(mesh)
    ring_size, a2a_size = mesh.shape.get(RING_AXIS, 1), mesh.shape.get(A2A_AXIS, 1)
    ways = ring_size * a2a_size
    if q.shape[1] % ways:
        raise ValueError(f"sequence length {q.shape[1]} does not split over {ways} sequence shards {axes}: "
                         f"pad the batch to a multiple of {ways}")
    local_len = q.shape[1] // ways
    if layout == "zigzag" and (local_len * a2a_size) % 2:
        raise ValueError(f"the zigzag layout needs an even length per ring shard; pad the sequence to a multiple "
                         f"of {2 * ways}")

    def attend(q, k, v, seg):
        if a2a_size == 1:
            return ring_stage(q, k, v, axis_name=RING_AXIS, causal=causal, segment_ids=seg, layout=layout,
                              implementation=implementation)[0]
        if ring_size == 1:
            return ulysses_attention(q, k, v, axis_name=A2A_AXIS, causal=causal, segment_ids=seg,
                                     implementation=implementation)
        return hybrid_attention(q, k, v, ring_axis=RING_AXIS, a2a_axis=A2A_AXIS, causal=causal, segment_ids=seg,
                                layout=layout, implementation=implementation)

    seq = axes[0] if len(axes) == 1 else axes
    qkv = PartitionSpec(rows, seq, heads, None)
    seg_spec = None if segment_ids is None else PartitionSpec(rows, seq)
    return jax.shard_map(attend, mesh=mesh, in_specs=(qkv, qkv, qkv, seg_spec), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)
