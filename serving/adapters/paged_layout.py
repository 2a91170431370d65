"""Where an adapter's weights sit inside the KV page pool (S-LoRA's unified paging), and how a
step gathers the batch's adapters back out of it.

S-LoRA keeps adapter weights and the KV cache in one memory pool so that memory moves between
them as the load changes. Here a page id names one page in every layer's K pool and V pool,
[page_size, kv_heads, head_dim] each, so a page offers `2 * E` elements per layer, E =
page_size * kv_heads * head_dim. An adapter takes whole pages from the same allocator as the
sequences (`PageAllocator.allocate_raw`) and writes layer l's weights into those pages of layer
l's pools — the same page ids in every layer, as a sequence's KV does.

Layout, per layer, of an adapter of rank r targeting modules M (in the canonical order of
`MODULES`): r "rank rows", row j being the concatenation over m in M of [A_m[:, j] (in_m
values), B_m[j, :] (out_m values)] — width W = sum over M of (in_m + out_m). The r * W values go
one after another through the adapter's pages, each page's K part (E values) then its V part.
Storing by rank rows (like S-LoRA's rows of hidden-size vectors per rank) makes the memory an
adapter takes proportional to its own rank: no adapter is padded to the largest rank in memory.

The step gathers the batch's adapters into stacked [n, in, R] / [n, R, out] arrays (R: the
largest rank in the batch, rounded up to a power of two), zero past each adapter's own rank —
padding exists only in this per-step working set, never in the pool. The gather runs inside
the jitted step, from the same (donated) pools the step then writes KV to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Canonical module order (PEFT's target_modules names of the LLM decoder's projections).
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_dims(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection LoRA may target, from an `LLMConfig`."""
    e, m = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """The pool's shape as the layout sees it."""

    num_layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    module_shapes: tuple  # ((module, (in, out)), ...): hashable, so a geometry can be a static jit argument

    @classmethod
    def of(cls, config, page_size: int) -> PoolGeometry:
        return cls(config.num_layers, page_size, config.num_kv_heads, config.head_dim,
                   tuple(module_dims(config).items()))

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        return dict(self.module_shapes)

    @property
    def half_page(self) -> int:
        """Values per page in one pool (K or V) of one layer."""
        return self.page_size * self.kv_heads * self.head_dim

    def row_width(self, modules) -> int:
        return sum(sum(self.dims[m]) for m in modules)

    def pages_for(self, rank: int, modules) -> int:
        """Pages an adapter of this rank over these modules takes from the pool."""
        return -(-rank * self.row_width(modules) // (2 * self.half_page))

    def module_offsets(self, modules) -> list[int]:
        """Each canonical module's start within a rank row (-1: not targeted)."""
        offsets, start = [], 0
        for m in MODULES:
            if m in modules:
                offsets.append(start)
                start += sum(self.dims[m])
            else:
                offsets.append(-1)
        return offsets


def ordered_modules(modules) -> tuple[str, ...]:
    unknown = set(modules) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; known: {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in modules)


def pack_layer(geometry: PoolGeometry, weights: dict, rank: int, num_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's {module: (a [in, r], b [r, out])} → its K and V page contents [num_pages, page_size, kv_heads, d]."""
    modules = ordered_modules(weights)
    rows = np.concatenate(
        [np.concatenate([np.asarray(weights[m][0]).T, np.asarray(weights[m][1])], axis=1) for m in modules], axis=1)
    if rows.shape != (rank, geometry.row_width(modules)):
        raise ValueError(f"rank rows {rows.shape} do not match rank {rank} and width {geometry.row_width(modules)}")
    stream = np.zeros((num_pages * 2 * geometry.half_page,), np.float32)
    stream[: rows.size] = rows.reshape(-1)
    pages = stream.reshape(num_pages, 2, geometry.page_size, geometry.kv_heads, geometry.head_dim)
    return pages[:, 0], pages[:, 1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotTable:
    """The working set of one step, host side: n adapters (padded rows have rank 0)."""

    pages: np.ndarray  # [n, max_pages] int32: each adapter's pages in order
    ranks: np.ndarray  # [n] int32
    widths: np.ndarray  # [n] int32: row width W of each adapter
    offsets: np.ndarray  # [n, len(MODULES)] int32: module start in the rank row, -1 = not targeted
    scales: np.ndarray  # [n] float32


def adapter_streams(k_pool, v_pool, table: SlotTable):
    """Traced: each slot's value stream [n, max_pages * 2E] (every page's K part, then its V part), one layer."""
    n, max_pages = table.pages.shape
    k = k_pool[table.pages].reshape(n, max_pages, 1, -1)
    v = v_pool[table.pages].reshape(n, max_pages, 1, -1)
    return jnp.concatenate([k, v], axis=2).reshape(n, -1)


def gather_module(streams, table: SlotTable, module_index: int, in_dim: int, out_dim: int, max_rank: int):
    """One layer's stacked (a [n, in, R], b [n, R, out]) of one module, read from the slots' streams.

    Values past an adapter's rank, and modules it does not target, come out as zeros. Traced
    (jnp) code: called inside the jitted step with the table's arrays on device.
    """
    offset = table.offsets[:, module_index]  # [n]
    rank_ids = jnp.arange(max_rank, dtype=jnp.int32)
    live = (rank_ids[None, :] < table.ranks[:, None]) & (offset[:, None] >= 0)  # [n, R]
    # Stream position of (adapter s, rank j, column c): j * W_s + offset_s + c; A's columns then B's.
    width = in_dim + out_dim
    pos = (rank_ids[None, :, None] * table.widths[:, None, None] + jnp.maximum(offset, 0)[:, None, None]
           + jnp.arange(width, dtype=jnp.int32)[None, None, :])
    pos = jnp.minimum(pos, streams.shape[1] - 1)  # dead entries (masked below) may point past the stream
    values = jnp.take_along_axis(streams, pos.reshape(pos.shape[0], -1), axis=1).reshape(pos.shape)
    values = jnp.where(live[:, :, None], values, jnp.zeros((), values.dtype))  # [n, R, in + out]
    return jnp.swapaxes(values[:, :, :in_dim], 1, 2), values[:, :, in_dim:]
