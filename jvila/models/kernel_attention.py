"""The attention interface served by the Pallas kernels (see `jvila.models.attention`).

Without a cache: flash attention (causal, segment ids). With the paged cache: paged decode
attention for one-token steps, ragged paged attention for prefill chunks and packed tokens.
Each kernel entry point dispatches by platform itself (cuDNN, Pallas or XLA on GPU; references
on CPU); `implementation` forces one, e.g. "pallas_interpret" in CPU tests.

On a mesh, every kernel call runs under `jax.shard_map`: XLA cannot partition a Pallas custom
call (Mosaic refuses outright; elsewhere it would gather whole activations onto each device).
Batch rows split over the mesh axes the logical name "batch" maps to and heads over those of
"q_heads" (when both q and kv head counts divide), exactly as the rule table places
activations, so the kernels see local shards and nothing moves. The mesh is `mesh` if given,
else the one set with `jax.set_mesh`; with neither, or one device, kernels are called directly.

A mesh whose sequence axes ("sequence": ring, "sequence_a2a": Ulysses) split anything makes the
cache-free path sequence-parallel: ring, Ulysses or both (`sharding.hybrid_attention`), chosen by
the mesh. `sequence_layout="zigzag"` says the batch was put in zigzag order once
(`sharding.load_balance.zigzag_batch`), so the ring's causal mask uses the true positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jvila.models.attention import CacheInfo, MaskInfo, dense_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention
from sharding.hybrid_attention import sequence_axes, sequence_parallel_attention
from sharding.rules import DEFAULT_RULES


def _divisible_axes(mesh, logical_name, sizes):
    """The mesh axes of `logical_name` (rule table order) whose running product divides all sizes."""
    axes = []
    for axis in dict(DEFAULT_RULES).get(logical_name) or ():
        if mesh.shape.get(axis, 1) == 1:
            continue
        ways = math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]
        if all(size % ways == 0 for size in sizes):
            axes.append(axis)
    return tuple(axes) or None


@dataclasses.dataclass(frozen=True)
class KernelAttention:
    """Hashable, so it can be a static argument of the jitted core functions."""

    implementation: str | None = None
    mesh: Mesh | None = None
    sequence_layout: str = "contiguous"  # or "zigzag" (see the module docstring)

    def __call__(self, q, k, v, *, mask_info: MaskInfo, cache_info: CacheInfo | None):
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            mesh = None
        if cache_info is None:
            return self._flash(mesh, q, k, v, mask_info.segment_ids)
        if cache_info.packed:  # already the ragged kernel's form
            return self._ragged(mesh, q[0], k, v, cache_info.page_table, cache_info.kv_lengths,
                                cache_info.cu_q_lens)[None]
        if q.shape[1] == 1:
            return self._decode(mesh, q, k, v, cache_info)
        return self._chunk(mesh, q, k, v, mask_info, cache_info)

    def _flash(self, mesh, q, k, v, segment_ids):
        def attend(q, k, v, seg):
            return flash_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                   implementation=self.implementation)

        if mesh is None:
            return attend(q, k, v, segment_ids)
        rows = _divisible_axes(mesh, "batch", [q.shape[0]])
        heads = _divisible_axes(mesh, "q_heads", [q.shape[2], k.shape[2]])
        if sequence_axes(mesh):
            return sequence_parallel_attention(q, k, v, segment_ids, mesh=mesh, rows=rows, heads=heads,
                                               layout=self.sequence_layout, implementation=self.implementation)
        qkv = PartitionSpec(rows, None, heads, None)
        seg = None if segment_ids is None else PartitionSpec(rows, None)
        return jax.shard_map(attend, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                             check_vma=False)(q, k, v, segment_ids)

    def _decode(self, mesh, q, k_pages, v_pages, cache_info):
        def attend(q, k_pages, v_pages, page_table, lengths):
            return paged_attention(q[:, 0], k_pages, v_pages, page_table, lengths,
                                   implementation=self.implementation)[:, None]

        args = (q, k_pages, v_pages, cache_info.page_table, cache_info.kv_lengths)
        if mesh is None:
            return attend(*args)
        # Every row may name any page, so the pools split by kv head only.
        rows = _divisible_axes(mesh, "batch", [q.shape[0]])
        heads = _divisible_axes(mesh, "q_heads", [q.shape[2], k_pages.shape[2]])
        q_spec, pool = PartitionSpec(rows, None, heads, None), PartitionSpec(None, None, heads, None)
        specs = (q_spec, pool, pool, PartitionSpec(rows, None), PartitionSpec(rows))
        return jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)

    def _chunk(self, mesh, q, k_pages, v_pages, mask_info, cache_info):
        # Rows hold right-padded chunks; the ragged kernel wants each sequence's real query
        # tokens packed back to back, so scatter them in and gather the outputs back out.
        batch, chunk = q.shape[:2]
        num_new = cache_info.kv_lengths - mask_info.positions[:, 0]
        cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_new, dtype=jnp.int32)])
        valid = jnp.arange(chunk)[None, :] < num_new[:, None]
        flat_index = jnp.where(valid, cu_q_lens[:-1, None] + jnp.arange(chunk)[None, :], batch * chunk)
        packed = jnp.zeros((batch * chunk, *q.shape[2:]), q.dtype).at[flat_index].set(q, mode="drop")
        out = self._ragged(mesh, packed, k_pages, v_pages, cache_info.page_table, cache_info.kv_lengths, cu_q_lens)
        out = out.at[flat_index].get(mode="fill", fill_value=0)
        return jnp.where(valid[..., None, None], out, 0).astype(q.dtype)

    def _ragged(self, mesh, packed, k_pages, v_pages, page_table, kv_lengths, cu_q_lens):
        """packed [T, q_heads, head_dim]: every row's query tokens back to back."""

        def attend(packed, k_pages, v_pages, page_table, kv_lengths, cu_q_lens):
            return ragged_paged_attention(packed, k_pages, v_pages, page_table, kv_lengths, cu_q_lens,
                                          implementation=self.implementation)

        args = (packed, k_pages, v_pages, page_table, kv_lengths, cu_q_lens)
        if mesh is None:
            return attend(*args)
        # Packed tokens of all rows share one axis: only heads split.
        heads = _divisible_axes(mesh, "q_heads", [packed.shape[1], k_pages.shape[2]])
        tokens, pool = PartitionSpec(None, heads, None), PartitionSpec(None, None, heads, None)
        specs = (tokens, pool, pool, PartitionSpec(), PartitionSpec(), PartitionSpec())
        return jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False)(*args)


def default_attention():
    """Kernels on accelerators; the dense reference on CPU, where it is the fastest path."""
    return dense_attention if jax.default_backend() == "cpu" else KernelAttention()
