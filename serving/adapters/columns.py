"""The step's adapters in the column layout (`jvila.models.lora.LoraColumns`), read out of the page pool.

Each adapter of a working set takes as many columns as its own rank (no adapter is padded to the
largest rank of the batch); column c of module m holds one of the adapter's rank rows
[A_m[:, j], B_m[j, :]] of `paged_layout`. The pool is read in units: the longest run of values
that divides both a half page (the K or the V part of a page) and every module's row width, so a
unit never straddles a page half and a rank row is a whole number of units. The host works out
where every unit of every column lies (page, K or V, offset: `column_table`); the traced gather
(`gather_columns`) reads them from each layer's pools with the same indices, since an adapter
holds the same page ids in every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from serving.adapters.paged_layout import MODULES, PoolGeometry


def unit_size(geometry: PoolGeometry) -> int:
    """Values per unit read: divides a half page and every module's rank-row width."""
    return math.gcd(geometry.half_page, *(a + b for a, b in geometry.dims.values()))


def column_bucket(n: int) -> int:
    """Columns a working set of total rank n is padded to: 8, 12, 16, 24, 32, 48, ... (at most 1.5x n).

    Few sizes keep the step's compilations few; padding columns cost a step matmul work, so the
    steps are finer than powers of two.
    """
    size = 8
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def tail_columns(owner: np.ndarray, token_adapters: np.ndarray) -> np.ndarray | None:
    """The columns of the adapters `token_adapters` use (`owner`: each column's adapter, -1 none), padded to a
    column bucket with an index past the set (a zero column): `LoraColumns.tail_columns` for those tokens.
    None when there are no such tokens or their columns take more than half of the set (a split would not pay
    for its copies of the columns)."""
    if token_adapters.size == 0:
        return None
    used = np.flatnonzero(np.isin(owner, token_adapters[token_adapters >= 0]))
    size = column_bucket(len(used))
    if 2 * size > len(owner):
        return None
    out = np.full((size,), len(owner), np.int32)
    out[: len(used)] = used
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ColumnTable:
    """Where each column's rank row lies in the pools, per module of the working set (host or device arrays)."""

    index: tuple  # per module [C, width / unit] int32: unit index into a pool viewed as [pages * half_page / unit, unit]
    from_v: tuple  # per module [C, width / unit] bool: the unit lies in the V pool (else K)
    live: tuple  # per module [C] bool: the column's adapter targets the module (else the column is zero)
    column_adapters: np.ndarray  # [C] int32, -1 = padding
    column_scales: np.ndarray  # [C] float32


def column_table(geometry: PoolGeometry, adapters, modules, num_columns: int) -> ColumnTable:
    """adapters: [(rank, targeted modules, page ids, scale)], adapter i's columns after adapter i-1's.

    `modules`: the working set's modules (canonical order), each a block of the table.
    """
    unit = unit_size(geometry)
    total = sum(rank for rank, *_ in adapters)
    if total > num_columns:
        raise ValueError(f"{num_columns} columns cannot hold adapters of total rank {total}")
    owner = np.full((num_columns,), -1, np.int32)
    scales = np.zeros((num_columns,), np.float32)
    starts = np.cumsum([0] + [rank for rank, *_ in adapters])
    for i, (_, _, _, scale) in enumerate(adapters):
        owner[starts[i]: starts[i + 1]] = i
        scales[starts[i]: starts[i + 1]] = scale
    index, from_v, live = [], [], []
    for m in modules:
        width = sum(geometry.dims[m]) // unit
        m_index = np.zeros((num_columns, width), np.int32)
        m_from_v = np.zeros((num_columns, width), bool)
        m_live = np.zeros((num_columns,), bool)
        for i, (rank, targeted, pages, _) in enumerate(adapters):
            units = _rank_row_units(geometry, rank, tuple(targeted), tuple(pages), m)
            if units is None:
                continue
            cols = slice(starts[i], starts[i + 1])
            m_index[cols], m_from_v[cols] = units
            m_live[cols] = True
        index.append(m_index)
        from_v.append(m_from_v)
        live.append(m_live)
    return ColumnTable(tuple(index), tuple(from_v), tuple(live), owner, scales)


@functools.lru_cache(maxsize=4096)
def _rank_row_units(geometry: PoolGeometry, rank: int, targeted: tuple, pages: tuple, module: str):
    """(unit index [rank, width / unit], from V [rank, width / unit]) of an adapter's rank rows of `module`
    (None: not targeted). A function of the page ids and the layout alone, so the few adapters a
    server keeps resident are worked out once, not at each rebuild of the working set."""
    offset = geometry.module_offsets(rank, targeted)[MODULES.index(module)]
    if offset < 0:
        return None
    unit = unit_size(geometry)
    half = geometry.half_page // unit
    width = sum(geometry.dims[module]) // unit
    # The adapter's stream position of each unit of its rank rows (offsets are whole rows: whole units).
    stream = offset // unit + np.arange(rank)[:, None] * width + np.arange(width)[None, :]
    page = np.asarray(pages, np.int64)[stream // (2 * half)]
    return (page * half + stream % half).astype(np.int32), (stream // half) % 2 == 1


def gather_column_layers(k_pages, v_pages, table: ColumnTable, *, modules, geometry: PoolGeometry, dtype=None):
    """Traced: per layer {module: ModuleLora(a [C, in] (Aᵀ), b [C, out])} of the table's columns, in `dtype` (None:
    the pools')."""
    from jvila.models.lora import ModuleLora  # only engines that serve adapters need the LoRA core

    unit = unit_size(geometry)
    layers = []
    for k_pool, v_pool in zip(k_pages, v_pages):
        k_units, v_units = k_pool.reshape(-1, unit), v_pool.reshape(-1, unit)
        entry = {}
        for j, m in enumerate(modules):
            index, from_v, live = table.index[j], table.from_v[j], table.live[j]
            rows = jnp.where(from_v[..., None], v_units[index], k_units[index]).reshape(index.shape[0], -1)
            # Columns of adapters that do not target m, and padding columns, read unit 0: zero them.
            rows = jnp.where(live[:, None], rows, jnp.zeros((), rows.dtype)).astype(dtype or rows.dtype)
            in_dim = geometry.dims[m][0]
            entry[m] = ModuleLora(rows[:, :in_dim], rows[:, in_dim:])
        layers.append(entry)
    return tuple(layers)


def gather_columns(k_pages, v_pages, table: ColumnTable, *, modules, num_adapters: int, geometry: PoolGeometry,
                   dtype=None):
    """Traced: the working set's `LoraColumns` read from every layer's pools, in `dtype` (None: the pools')."""
    from jvila.models.lora import LoraColumns

    layers = gather_column_layers(k_pages, v_pages, table, modules=modules, geometry=geometry, dtype=dtype)
    return LoraColumns(layers, jnp.asarray(table.column_adapters), jnp.asarray(table.column_scales), num_adapters)


def place_columns(layers, k_pages, v_pages, table: ColumnTable, positions, *, modules, geometry: PoolGeometry):
    """Traced: `layers` (a working set's per-layer columns) with the table's columns read from the pools and
    written at column `positions` [table columns] (positions past the working set's columns are dropped:
    the table's padding), in the working set's dtype. The rest of the working set is untouched, so adding adapters
    to it reads only them."""
    from jvila.models.lora import ModuleLora

    first = next(iter(layers[0].values())).a  # the working set's dtype and column count
    new = gather_column_layers(k_pages, v_pages, table, modules=modules, geometry=geometry, dtype=first.dtype)
    # Each column's table column (-1: kept). A select over gathered rows, not a scatter into the set: XLA:CPU
    # scatters 16-bit rows several times slower than it gathers them.
    size = first.shape[0]
    source = jnp.full((size,), -1, jnp.int32).at[positions].set(jnp.arange(positions.shape[0], dtype=jnp.int32),
                                                                 mode="drop")
    fresh, rows = source >= 0, jnp.maximum(source, 0)

    def put(kept, read):
        return jnp.where(fresh[:, None], jnp.take(read, rows, axis=0), kept)

    return tuple({m: ModuleLora(put(layer[m].a, read[m].a), put(layer[m].b, read[m].b)) for m in layer}
                 for layer, read in zip(layers, new))


def relayout_columns(layers, source, k_pages, v_pages, table, positions, *, modules, geometry: PoolGeometry):
    """Traced: new columns [len(source)] copied from `layers`' columns `source` (out of range: zeros), then the
    table's adapters read from the pools into `positions` (none when table is None). A working set changing
    size keeps what it holds without reading it from the pools again."""
    from jvila.models.lora import ModuleLora

    copied = tuple({m: ModuleLora(jnp.take(pair.a, source, axis=0, mode="fill", fill_value=0),
                                  jnp.take(pair.b, source, axis=0, mode="fill", fill_value=0))
                    for m, pair in layer.items()} for layer in layers)
    if table is None:
        return copied
    return place_columns(copied, k_pages, v_pages, table, positions, modules=modules, geometry=geometry)
