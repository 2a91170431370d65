"""One step's adapters: the per-token adapter index, and the working set the step reads them from.

Rows of a step may each use a different adapter (or none). The step reads its adapters from a
working set: a device copy of some resident adapters, read out of the KV page pool (where they
live: unified paging), each at a known index; a token's index is its row's adapter's, -1 for the
base model. Building a working set copies the adapters out of the pool, so it is kept from step
to step (`WorkingSet`): while the same requests decode, step after step reuses it. In the
columns layout a step that needs adapters it lacks reads just those, into free columns (columns
no adapter holds, or held by adapters the step does not use, which leave the set), so a request
joining a running batch costs one read of its own adapter, not of the batch's; when the step's
column bucket differs from the set's, or the new adapters find no free run, the set is laid out
again with exactly the step's adapters, those it held copied on the device. The slots layout is
read again whole whenever a step needs an adapter it lacks. An adapter keeps its pages while
resident and is re-read after any new load (`ResidentAdapters.serial_of`), so a kept copy never
goes stale.

Two layouts: "columns" (`serving.adapters.columns`, `jvila.models.lora.LoraColumns`), every
adapter at its own rank side by side, for the CPU, where one pair of matmuls per projection beats
any gather per token; "slots" (`LoraWeights`: [n, in, R] with R the largest rank of the set,
rounded up to a power of two, zero past each adapter's own), for the batched kernels elsewhere.
Either way the padding exists only in the working set, never in the pool. Slot counts, rank and
column counts are bucketed so that the number of step compilations stays small. The working set
may hold the adapters narrower than the pools (`dtype`, vLLM's `--lora-dtype`): bfloat16 adapters
beside a float32 model halve the bytes every step reads for them, and on CPU their products run
faster too (the adapted tokens then take x and x @ A at bfloat16 width, accumulating in float32).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from serving.adapters.columns import (
    column_bucket,
    column_table,
    gather_columns,
    place_columns,
    relayout_columns,
    tail_columns,
)
from serving.adapters.paged_layout import (
    MODULES,
    PoolGeometry,
    SlotTable,
    adapter_streams,
    gather_module,
)

MIN_RANK = 8  # smallest rank bucket of the slots layout (S-LoRA's smallest common rank)
LAYOUTS = ("columns", "slots")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class LoraBatch:
    """What a step needs for LoRA: each token's adapter index and the working set on the device."""

    token_adapters: np.ndarray  # [T] int32: index of each packed token's adapter in `weights`, -1 = base
    weights: object  # jvila.models.lora.LoraColumns or LoraWeights: the working set
    names: tuple[str, ...]  # the step's adapters, for observation
    column_owner: np.ndarray | None = None  # columns layout: each column's adapter index (weights.column_adapters)

    def step_weights(self, token_adapters: np.ndarray, tail_start: int):
        """The adapters a step of these (padded) token adapters reads. In the columns layout, tokens from
        `tail_start` on (the engine packs short rows first: these are its long rows' tokens) multiply just their
        own adapters' columns when those are at most half of the set (`LoraColumns.tail_columns`): a prompt
        joining a batch decoding with many adapters multiplies its tokens by its own adapter, not by all of them
        (`benchmarks/lora_columns_cpu.py`)."""
        if self.column_owner is None or tail_start >= len(token_adapters):
            return self.weights
        columns = tail_columns(self.column_owner, token_adapters[tail_start:])
        if columns is None:
            return self.weights
        return dataclasses.replace(self.weights, tail_columns=jnp.asarray(columns), tail_start=tail_start)


def default_layout() -> str:
    return "columns" if jax.default_backend() == "cpu" else "slots"


class WorkingSet:
    """The device copy of the adapters of recent steps; `step_inputs` reads from the pools only what a step lacks.

    `read_pools()` returns the engine's current (K pools, V pools); `resident` says where each
    resident adapter's pages are and which load of it they hold.
    """

    def __init__(self, store, resident, geometry: PoolGeometry, read_pools, *, layout: str | None = None,
                 dtype=None):
        layout = layout or default_layout()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown working-set layout {layout!r}; choose one of {LAYOUTS}")
        self.store, self.resident, self.geometry, self.layout = store, resident, geometry, layout
        self.dtype = None if dtype is None else jnp.dtype(dtype)  # None: the pools' dtype
        self._read_pools = read_pools
        self._index: dict[tuple[str, int], int] = {}  # (name, load serial) → index in the working set
        self._weights = None
        # Columns layout, host side: the working set's modules, each column's adapter index (-1: free) and scale.
        self._modules: tuple[str, ...] = ()
        self._owner = self._scales = None
        self.counts = {"working_set_builds": 0, "working_set_additions": 0, "working_set_relayouts": 0}

    def step_inputs(self, row_adapters, row_tokens) -> LoraBatch | None:
        """row_adapters [B] (name or None), row_tokens [B] (tokens each row feeds) → the step's LoraBatch."""
        names: list[str] = []
        for name in row_adapters:
            if name is not None and name not in names:
                names.append(name)
        if not names:
            return None
        keys = [(name, self.resident.serial_of(name)) for name in names]
        if self._weights is None or not self._fit(names, keys):
            self._build(names, keys)
        index = {name: self._index[key] for name, key in zip(names, keys)}
        token_adapters = np.repeat(np.asarray([-1 if a is None else index[a] for a in row_adapters], np.int32),
                                   np.asarray(row_tokens, np.int64))
        return LoraBatch(token_adapters, self._weights, tuple(names),
                         self._owner if self.layout == "columns" else None)

    def _fit(self, names, keys) -> bool:
        """Make the kept set serve the step without reading it whole again; False: build it anew.

        Columns layout: the set is kept at the column bucket of the step's total rank. At that bucket,
        adapters it lacks are read into free columns in place (`_add`); at another (the batch grew past
        it, or shrank a bucket below it: extra columns cost every token of every step matmul work) or when
        they do not fit, the set is laid out again at the step's bucket, its kept adapters copied on the
        device and only the others read from the pools (`_relayout`). A module the set lacks: built anew.
        """
        missing = [(name, key) for name, key in zip(names, keys) if key not in self._index]
        if self.layout != "columns":
            return not missing
        adapters = [self.store.get(name) for name in names]
        if any(m not in self._modules for a in adapters for m in a.modules):
            return False
        size = column_bucket(sum(a.rank for a in adapters))
        if size == self._weights.num_columns and (not missing or self._add(missing, keys)):
            return True
        self._relayout(names, keys, size)
        return True

    def clear(self) -> None:
        """Drop the device copy (it is rebuilt on the next step that serves an adapter)."""
        self._index, self._weights = {}, None

    def _build(self, names, keys) -> None:
        """A new working set holding exactly the step's adapters."""
        self._weights = None  # the old copy goes before the new one is read
        adapters = [self.store.get(name) for name in names]
        pages = [self.resident.pages_of(name) for name in names]
        modules = tuple(m for m in MODULES if any(m in a.modules for a in adapters))
        k_pages, v_pages = self._read_pools()
        if self.layout == "columns":
            num_columns = column_bucket(sum(a.rank for a in adapters))
            table = column_table(self.geometry, [(a.rank, a.modules, p, a.scale) for a, p in zip(adapters, pages)],
                                 modules, num_columns)
            # The index bound is the column count (each adapter holds a column at least), not the number of
            # adapters held: the step's compilation then depends on the column bucket alone.
            self._weights = _gather_columns(k_pages, v_pages, table, modules=modules, num_adapters=num_columns,
                                            geometry=self.geometry, dtype=self.dtype)
            self._modules, self._owner, self._scales = modules, table.column_adapters, table.column_scales
        else:
            table, max_rank = slot_table(adapters, pages, self.geometry)
            self._weights = _gather_slots(k_pages, v_pages, table, modules=modules, max_rank=max_rank,
                                          geometry=self.geometry, dtype=self.dtype)
        self._index = {key: i for i, key in enumerate(keys)}
        self.counts["working_set_builds"] += 1

    def _add(self, missing, keys) -> bool:
        """Columns layout: read just the `missing` adapters into free columns of the kept set (columns no
        adapter holds, or held by adapters this step does not use, which then leave the set); False when
        one finds no contiguous free run."""
        adapters = [self.store.get(name) for name, _ in missing]
        owner = self._owner.copy()
        wanted = {self._index[key] for key in keys if key in self._index}
        free = (owner < 0) | ~np.isin(owner, list(wanted))
        starts = []
        for adapter in adapters:  # first fit, in the step's order
            start = _first_run(free, adapter.rank)
            if start is None:
                return False
            free[start: start + adapter.rank] = False
            starts.append(start)
        # Adapters whose columns are overwritten leave the set whole; their other columns become free.
        new_columns = np.concatenate([np.arange(s, s + a.rank) for s, a in zip(starts, adapters)])
        for gone in set(owner[new_columns].tolist()) - {-1}:
            owner[owner == gone] = -1
        held = set(owner.tolist())
        self._index = {key: i for key, i in self._index.items() if i in held}
        used = set(self._index.values())
        ids = (i for i in range(len(owner)) if i not in used)
        scales = self._scales.copy()
        for (name, key), adapter, start in zip(missing, adapters, starts):
            i = next(ids)
            owner[start: start + adapter.rank], scales[start: start + adapter.rank] = i, adapter.scale
            self._index[key] = i
        table, positions = self._fresh_columns([(name, a, s) for (name, _), a, s in zip(missing, adapters, starts)],
                                               len(owner))
        k_pages, v_pages = self._read_pools()
        old, self._weights = self._weights, None
        layers = _place_columns(old.layers, k_pages, v_pages, table, positions, modules=self._modules,
                                geometry=self.geometry)
        self._weights = dataclasses.replace(old, layers=layers, column_adapters=jnp.asarray(owner),
                                            column_scales=jnp.asarray(scales))
        self._owner, self._scales = owner, scales
        self.counts["working_set_additions"] += 1
        return True

    def _relayout(self, names, keys, size: int) -> None:
        """Columns layout: a set of `size` columns holding exactly the step's adapters side by side, those the
        kept set holds copied from it on the device, the others read from the pools."""
        adapters = [self.store.get(name) for name in names]
        starts = np.cumsum([0] + [a.rank for a in adapters[:-1]])
        kept = self._weights.num_columns
        source = np.full((size,), kept, np.int32)  # each new column's column in the kept set (past its end: none)
        owner, scales = np.full((size,), -1, np.int32), np.zeros((size,), np.float32)
        fresh = []
        for i, (key, adapter, start) in enumerate(zip(keys, adapters, starts)):
            columns = slice(start, start + adapter.rank)
            owner[columns], scales[columns] = i, adapter.scale
            if key in self._index:
                source[columns] = np.flatnonzero(self._owner == self._index[key])
            else:
                fresh.append((key[0], adapter, start))
        table, positions = self._fresh_columns(fresh, size) if fresh else (None, None)
        k_pages, v_pages = self._read_pools()
        old, self._weights = self._weights, None
        layers = _relayout_columns(old.layers, source, k_pages, v_pages, table, positions, modules=self._modules,
                                   geometry=self.geometry)
        self._weights = dataclasses.replace(old, layers=layers, column_adapters=jnp.asarray(owner),
                                            column_scales=jnp.asarray(scales), num_adapters=size)
        self._owner, self._scales = owner, scales
        self._index = {key: i for i, key in enumerate(keys)}
        self.counts["working_set_relayouts"] += 1

    def _fresh_columns(self, fresh, size: int):
        """The column table reading `fresh` [(name, adapter, first column)] from the pools, and the set's column
        each table column goes to (the table's padding: `size`, past the set's columns, dropped)."""
        specs = [(a.rank, a.modules, self.resident.pages_of(name), a.scale) for name, a, _ in fresh]
        columns = np.concatenate([np.arange(start, start + a.rank) for _, a, start in fresh])
        table = column_table(self.geometry, specs, self._modules, column_bucket(len(columns)))
        positions = np.full((table.column_adapters.shape[0],), size, np.int32)
        positions[: len(columns)] = columns
        return table, positions


def _first_run(free: np.ndarray, length: int) -> int | None:
    """Start of the first run of `length` True values in `free`, or None."""
    run = 0
    for i, ok in enumerate(free.tolist()):
        run = run + 1 if ok else 0
        if run == length:
            return i - length + 1
    return None


_gather_columns = jax.jit(gather_columns, static_argnames=("modules", "num_adapters", "geometry", "dtype"))
# The kept columns are donated: an addition's result reuses their buffers.
_place_columns = jax.jit(place_columns, static_argnames=("modules", "geometry"), donate_argnames=("layers",))
_relayout_columns = jax.jit(relayout_columns, static_argnames=("modules", "geometry"))


# ---- the slots layout ------------------------------------------------------------------------------


def slot_table(adapters, pages, geometry: PoolGeometry) -> tuple[SlotTable, int]:
    """The slots layout's table (slot i = adapters[i], whose pages are pages[i]) and its rank R."""
    n = _pow2(len(adapters))
    table = SlotTable(
        pages=np.zeros((n, _pow2(max(len(p) for p in pages))), np.int32),
        ranks=np.zeros((n,), np.int32),
        offsets=np.full((n, len(MODULES)), -1, np.int32),
        scales=np.zeros((n,), np.float32),
    )
    for i, (adapter, p) in enumerate(zip(adapters, pages)):
        table.pages[i, : len(p)] = p
        table.ranks[i] = adapter.rank
        table.offsets[i] = geometry.module_offsets(adapter.rank, adapter.modules)
        table.scales[i] = adapter.scale
    return table, _pow2(max(a.rank for a in adapters), MIN_RANK)


def gather_layers(k_pages, v_pages, table: SlotTable, *, modules, max_rank: int, geometry: PoolGeometry):
    """Traced: per layer {module: (a [n, in, R], b [n, R, out])} gathered from the pools, in the pools' dtype."""
    layers = []
    for k_pool, v_pool in zip(k_pages, v_pages):
        streams = adapter_streams(k_pool, v_pool, table, max_rank * geometry.max_module_width)
        layer = {}
        for m in modules:
            in_dim, out_dim = geometry.dims[m]
            layer[m] = gather_module(streams, table, MODULES.index(m), in_dim, out_dim, max_rank)
        layers.append(layer)
    return layers


@functools.partial(jax.jit, static_argnames=("modules", "max_rank", "geometry", "dtype"))
def _gather_slots(k_pages, v_pages, table: SlotTable, *, modules, max_rank: int, geometry: PoolGeometry, dtype=None):
    """The slots layout's `LoraWeights` (the functional core's stacked adapters) gathered from the pools, in
    `dtype` (None: the pools')."""
    from jvila.models.lora import (  # only engines that serve adapters need the LoRA core
        LoraWeights,
        ModuleLora,
    )

    layers = gather_layers(k_pages, v_pages, table, modules=modules, max_rank=max_rank, geometry=geometry)
    return LoraWeights(tuple({m: ModuleLora(*(w.astype(dtype or w.dtype) for w in pair)) for m, pair in layer.items()}
                             for layer in layers), table.scales)
