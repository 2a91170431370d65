"""The attention interface served by the Pallas kernels (see `jvila.models.attention`).

Without a cache: flash attention (causal, segment ids). With the paged cache: paged decode
attention for one-token steps, ragged paged attention for prefill chunks. Each kernel entry
point dispatches by platform itself (cuDNN, Pallas or XLA on GPU; references on CPU);
`implementation` forces one, e.g. "pallas_interpret" in CPU tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jvila.models.attention import CacheInfo, MaskInfo, dense_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class KernelAttention:
    """Hashable, so it can be a static argument of the jitted core functions."""

    implementation: str | None = None

    def __call__(self, q, k, v, *, mask_info: MaskInfo, cache_info: CacheInfo | None):
        if cache_info is None:
            seg = mask_info.segment_ids
            return flash_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                   implementation=self.implementation)
        if q.shape[1] == 1:
            out = paged_attention(q[:, 0], k, v, cache_info.page_table, cache_info.kv_lengths,
                                  implementation=self.implementation)
            return out[:, None]
        return self._chunk(q, k, v, mask_info, cache_info)

    def _chunk(self, q, k_pages, v_pages, mask_info, cache_info):
        # Rows hold right-padded chunks; the ragged kernel wants each sequence's real query
        # tokens packed back to back, so scatter them in and gather the outputs back out.
        batch, chunk = q.shape[:2]
        num_new = cache_info.kv_lengths - mask_info.positions[:, 0]
        cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_new, dtype=jnp.int32)])
        valid = jnp.arange(chunk)[None, :] < num_new[:, None]
        flat_index = jnp.where(valid, cu_q_lens[:-1, None] + jnp.arange(chunk)[None, :], batch * chunk)
        packed = jnp.zeros((batch * chunk, *q.shape[2:]), q.dtype).at[flat_index].set(q, mode="drop")
        out = ragged_paged_attention(packed, k_pages, v_pages, cache_info.page_table, cache_info.kv_lengths,
                                     cu_q_lens, implementation=self.implementation)
        out = out.at[flat_index].get(mode="fill", fill_value=0)
        return jnp.where(valid[..., None, None], out, 0).astype(q.dtype)


def default_attention():
    """Kernels on accelerators; the dense reference on CPU, where it is the fastest path."""
    return dense_attention if jax.default_backend() == "cpu" else KernelAttention()
