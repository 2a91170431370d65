"""Where an adapter's weights sit inside the KV page pool (S-LoRA's unified paging), and how a
step gathers the batch's adapters back out of it.

S-LoRA keeps adapter weights and the KV cache in one memory pool so that memory moves between
them as the load changes. Here a page id names one page in every layer's K pool and V pool,
[page_size, kv_heads, head_dim] each, so a page offers `2 * E` values per layer, E =
page_size * kv_heads * head_dim. An adapter takes whole pages from the same allocator as the
sequences (`PageAllocator.allocate_raw`) and writes layer l's weights into those pages of layer
l's pools — the same page ids in every layer, as a sequence's KV does.

Layout, per layer, of an adapter of rank r targeting modules M: one block per module m in M (in
the canonical order of `MODULES`), the block being r "rank rows" [A_m[:, j] (in_m values),
B_m[j, :] (out_m values)] — like S-LoRA's rows of hidden-size vectors, one per rank. The blocks
follow one another through the adapter's pages, each page's K part (E values) then its V part.
The memory an adapter takes is proportional to its own rank and its own modules: no adapter is
padded to the largest rank (or to every module) in memory.

The step gathers the batch's adapters into stacked [n, in, R] / [n, R, out] arrays (R: the
largest rank in the batch, rounded up to a power of two), zero past each adapter's own rank —
padding exists only in this per-step working set, never in the pool. It reads whole pages (one
gather of page windows), then each module's block as one contiguous window per adapter, inside
the jitted step, from the same (donated) pools the step then writes KV to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from serving.buckets import page_bucket

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

    @property
    def max_module_width(self) -> int:
        return max(a + b for a, b in self.dims.values())

    def values_for(self, rank: int, modules) -> int:
        """Values per layer an adapter of this rank over these modules stores."""
        return rank * sum(sum(self.dims[m]) for m in modules)

    def pages_for(self, rank: int, modules) -> int:
        """Pages an adapter of this rank over these modules takes from the pool."""
        return -(-self.values_for(rank, modules) // (2 * self.half_page))

    def largest_adapter_pages(self, max_rank: int) -> int:
        """Pages the largest adapter the pool may have to hold takes: max_rank on every module."""
        return self.pages_for(max_rank, MODULES)

    def module_offsets(self, rank: int, modules) -> list[int]:
        """Where each canonical module's block starts in the adapter's per-layer values (-1: not targeted)."""
        offsets, start = [], 0
        for m in MODULES:
            if m in modules:
                offsets.append(start)
                start += rank * sum(self.dims[m])
            else:
                offsets.append(-1)
        return offsets


def ordered_modules(modules) -> tuple[str, ...]:
    unknown = set(modules) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; known: {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in modules)


def stream_length(values: int) -> int:
    """Values per layer an adapter's stream is kept with: its own, bucketed (two sizes per doubling), so that loads
    of adapters of many ranks share few compiled writes."""
    return page_bucket(values)


def pack_stream(dims, layers, rank: int, modules) -> np.ndarray:
    """Per-layer {module: (a [in, r], b [r, out])} → [layers, stream_length(values)] float32: each layer's rank
    rows of each module in canonical order (the values its pages hold, each page's K part then its V part),
    zeros past them. The store keeps adapters this way, so a load writes the pages with no packing."""
    modules = ordered_modules(modules)
    values = rank * sum(sum(dims[m]) for m in modules)
    stream = np.zeros((len(layers), stream_length(values)), np.float32)
    offset = 0
    for m in modules:
        rows = _rank_rows(stream, offset, rank, dims[m])
        for i, layer in enumerate(layers):
            a, b = layer[m]
            rows[i, :, : dims[m][0]], rows[i, :, dims[m][0]:] = np.asarray(a).T, b
        offset += rank * sum(dims[m])
    return stream


def stream_layers(dims, stream: np.ndarray, rank: int, modules) -> tuple:
    """Per layer {module: (a [in, r], b [r, out])}, views into a `pack_stream` stream (nothing copied)."""
    layers = [{} for _ in range(stream.shape[0])]
    offset = 0
    for m in ordered_modules(modules):
        rows = _rank_rows(stream, offset, rank, dims[m])
        for i, layer in enumerate(layers):
            layer[m] = (rows[i, :, : dims[m][0]].T, rows[i, :, dims[m][0]:])
        offset += rank * sum(dims[m])
    return tuple(layers)


def _rank_rows(stream, offset: int, rank: int, dims) -> np.ndarray:
    """A view [layers, rank, in + out] of one module's block of a stream."""
    width = sum(dims)
    return stream[:, offset: offset + rank * width].reshape(stream.shape[0], rank, width)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotTable:
    """The working set of one step, host side: n adapters (padded rows have rank 0)."""

    pages: np.ndarray  # [n, max_pages] int32: each adapter's pages in order
    ranks: np.ndarray  # [n] int32
    offsets: np.ndarray  # [n, len(MODULES)] int32: start of each module's block, -1 = not targeted
    scales: np.ndarray  # [n] float32


def adapter_streams(k_pool, v_pool, table: SlotTable, tail: int):
    """Traced: each slot's values [n, max_pages * 2E + tail] (every page's K part, then its V part), one layer.

    `tail` zeros at the end keep every fixed-size window read of `gather_module` inside the stream.
    """
    n, max_pages = table.pages.shape
    k = k_pool[table.pages].reshape(n, max_pages, 1, -1)
    v = v_pool[table.pages].reshape(n, max_pages, 1, -1)
    streams = jnp.concatenate([k, v], axis=2).reshape(n, -1)
    return jnp.concatenate([streams, jnp.zeros((n, tail), streams.dtype)], axis=1)


def gather_module(streams, table: SlotTable, module_index: int, in_dim: int, out_dim: int, max_rank: int):
    """One layer's stacked (a [n, in, R], b [n, R, out]) of one module, read from the slots' streams.

    Each adapter's block is one contiguous window of R rows (rows past its rank, and modules it
    does not target, are zeroed). Traced (jnp) code, inside the jitted step.
    """
    offset = table.offsets[:, module_index]  # [n]
    width = in_dim + out_dim
    window = jax.vmap(lambda stream, start: jax.lax.dynamic_slice(stream, (start,), (max_rank * width,)))(
        streams, jnp.maximum(offset, 0))
    rows = window.reshape(-1, max_rank, width)
    live = (jnp.arange(max_rank)[None, :] < table.ranks[:, None]) & (offset[:, None] >= 0)  # [n, R]
    rows = jnp.where(live[:, :, None], rows, jnp.zeros((), rows.dtype))
    return jnp.swapaxes(rows[:, :, :in_dim], 1, 2), rows[:, :, in_dim:]
