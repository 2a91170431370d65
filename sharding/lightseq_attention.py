"""LightSeq's balanced causal schedule (DistFlashAttn): idle ranks compute for busy ones.

Contiguous shards, n ranks (n even), causal. Rank r needs its queries against key blocks 0..r.
The plain ring gives rank 0 nothing to do after step 0 while rank n-1 works every step. LightSeq
pairs ranks at distance t in step t = 1..n/2: of the pair (a, a+t mod n), the one holding the
later chunk needs the other's K/V. If a+t < n, rank a sends K/V up and rank a+t attends them
("local" work); otherwise rank a sends its *queries* down to a+t-n, which attends them against its
own K/V ("help" work) and sends the partial (out, lse) back, one step later in LightSeq (here in
the same step) to be merged by lse. In every step each rank does exactly one block, so the causal
work is done in n/2 + 1 steps of one full block each instead of n ring steps; at t = n/2 both
directions name the same pair, so only the K/V direction runs (ranks below n/2 are idle then).

In SPMD form every rank runs the same program: each step is one flash call whose inputs are
chosen by rank (own queries with received K/V, or received queries with own K/V), and partial
`ppermute`s whose non-receivers get zeros (masked to lse = -inf). The backward is JAX's autodiff
of this forward (transposed ppermutes), not a hand-scheduled one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import (
    flash_attention_with_lse,
    merge_attention_partials,
)


def _send(x, axis_name, pairs):
    return None if x is None else lax.ppermute(x, axis_name, pairs)


def _pick(flag, a, b):
    return None if a is None else jnp.where(flag, a, b)


def lightseq_attention(q, k, v, *, axis_name, segment_ids=None, sm_scale=None, implementation=None):
    """(out, lse) of this rank's contiguous causal shard; call inside `jax.shard_map`."""
    n = lax.axis_size(axis_name)
    if n % 2:
        raise ValueError(f"LightSeq's schedule pairs ranks and needs an even ring; {axis_name!r} has {n} devices: "
                         "use the zigzag layout instead")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"equal local q and kv lengths needed, got {q.shape[1]} and {k.shape[1]}")
    me = lax.axis_index(axis_name)
    length = q.shape[1]
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    common = dict(sm_scale=sm_scale, implementation=implementation)
    out, lse = flash_attention_with_lse(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                        q_offset=me * length, kv_offset=me * length, **common)
    for t in range(1, n // 2 + 1):
        up = [(r, r + t) for r in range(n) if r + t < n]  # K/V to the later rank that needs them
        k_in, v_in, kv_seg_in = (_send(x, axis_name, up) for x in (k, v, seg))
        local = me >= t  # holds the later chunk of its pair: attends received K/V
        if t < n // 2:
            down = [(r, r + t - n) for r in range(n) if r + t >= n]  # queries to the earlier rank
            q_in, q_seg_in = _send(q, axis_name, down), _send(seg, axis_name, down)
        else:  # the pair at distance n/2 is already served by the K/V direction
            q_in, q_seg_in = q, seg
        block_q = _pick(local, q, q_in)
        block_k, block_v = _pick(local, k_in, k), _pick(local, v_in, v)
        block_q_seg = _pick(local, seg, q_seg_in)
        block_kv_seg = _pick(local, kv_seg_in, seg)
        part_out, part_lse = flash_attention_with_lse(block_q, block_k, block_v, causal=False,
                                                      q_segment_ids=block_q_seg, kv_segment_ids=block_kv_seg,
                                                      **common)
        # Local work merges here; help work goes back to the rank whose queries it used.
        out, lse = merge_attention_partials(out, lse, jnp.where(local, part_out, 0),
                                            jnp.where(local, part_lse, -jnp.inf))
        if t < n // 2:
            back = [(b, a) for a, b in down]
            help_out = _send(jnp.where(local, 0, part_out), axis_name, back)
            help_lse = _send(jnp.where(local, -jnp.inf, part_lse), axis_name, back)
            receives = me >= n - t  # the ranks that sent their queries down this step
            out, lse = merge_attention_partials(out, lse, jnp.where(receives, help_out, 0),
                                                jnp.where(receives, help_lse, -jnp.inf))
    return out, lse
