"""One step's adapters: the per-token adapter index, and the working set the step reads them from.

Rows of a step may each use a different adapter (or none). The step reads its adapters from a
working set: a device copy of some resident adapters, read out of the KV page pool (where they
live: unified paging), each at a known index; a token's index is its row's adapter's, -1 for the
base model. Building a working set copies the adapters out of the pool, so it is kept from step
to step (`WorkingSet`) and rebuilt only when a step needs an adapter it lacks, or (columns) when it
holds a column bucket more than the step needs — then with exactly that step's adapters: while the
same requests decode, step after step reuses it. An adapter
keeps its pages while resident and is re-read after any new load (`ResidentAdapters.serial_of`),
so a kept copy never goes stale.

Two layouts: "columns" (`serving.adapters.columns`, `jvila.models.lora.LoraColumns`), every
adapter at its own rank side by side, for the CPU, where one pair of matmuls per projection beats
any gather per token; "slots" (`LoraWeights`: [n, in, R] with R the largest rank of the set,
rounded up to a power of two, zero past each adapter's own), for the batched kernels elsewhere.
Either way the padding exists only in the working set, never in the pool. Slot counts, rank and
column counts are bucketed so that the number of step compilations stays small.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from serving.adapters.columns import column_bucket, column_table, gather_columns
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


def default_layout() -> str:
    return "columns" if jax.default_backend() == "cpu" else "slots"


class WorkingSet:
    """The device copy of the adapters of recent steps; `step_inputs` rebuilds it only when a step needs more.

    `read_pools()` returns the engine's current (K pools, V pools); `resident` says where each
    resident adapter's pages are and which load of it they hold.
    """

    def __init__(self, store, resident, geometry: PoolGeometry, read_pools, *, layout: str | None = None):
        layout = layout or default_layout()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown working-set layout {layout!r}; choose one of {LAYOUTS}")
        self.store, self.resident, self.geometry, self.layout = store, resident, geometry, layout
        self._read_pools = read_pools
        self._index: dict[tuple[str, int], int] = {}  # (name, load serial) → index in the working set
        self._weights = None
        self.counts = {"working_set_builds": 0}

    def step_inputs(self, row_adapters, row_tokens) -> LoraBatch | None:
        """row_adapters [B] (name or None), row_tokens [B] (tokens each row feeds) → the step's LoraBatch."""
        names: list[str] = []
        for name in row_adapters:
            if name is not None and name not in names:
                names.append(name)
        if not names:
            return None
        keys = [(name, self.resident.serial_of(name)) for name in names]
        if self._weights is None or any(key not in self._index for key in keys) or self._oversized(names):
            self._build(names, keys)
        index = {name: self._index[key] for name, key in zip(names, keys)}
        token_adapters = np.repeat(np.asarray([-1 if a is None else index[a] for a in row_adapters], np.int32),
                                   np.asarray(row_tokens, np.int64))
        return LoraBatch(token_adapters, self._weights, tuple(names))

    def _oversized(self, names) -> bool:
        """Whether the kept column set is a bucket larger than the step needs (its extra columns cost every
        token of every step matmul work, a rebuild costs one read of the step's adapters)."""
        if self.layout != "columns":
            return False
        return column_bucket(sum(self.store.get(name).rank for name in names)) < self._weights.num_columns

    def clear(self) -> None:
        """Drop the device copy (it is rebuilt on the next step that serves an adapter)."""
        self._index, self._weights = {}, None

    def _build(self, names, keys) -> None:
        self._weights = None  # the old copy goes before the new one is read
        adapters = [self.store.get(name) for name in names]
        pages = [self.resident.pages_of(name) for name in names]
        modules = tuple(m for m in MODULES if any(m in a.modules for a in adapters))
        k_pages, v_pages = self._read_pools()
        if self.layout == "columns":
            num_columns = column_bucket(sum(a.rank for a in adapters))
            table = column_table(self.geometry, [(a.rank, a.modules, p, a.scale) for a, p in zip(adapters, pages)],
                                 modules, num_columns)
            self._weights = _gather_columns(k_pages, v_pages, table, modules=modules, num_adapters=len(names),
                                            geometry=self.geometry)
        else:
            table, max_rank = slot_table(adapters, pages, self.geometry)
            self._weights = _gather_slots(k_pages, v_pages, table, modules=modules, max_rank=max_rank,
                                          geometry=self.geometry)
        self._index = {key: i for i, key in enumerate(keys)}
        self.counts["working_set_builds"] += 1


_gather_columns = jax.jit(gather_columns, static_argnames=("modules", "num_adapters", "geometry"))


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


@functools.partial(jax.jit, static_argnames=("modules", "max_rank", "geometry"))
def _gather_slots(k_pages, v_pages, table: SlotTable, *, modules, max_rank: int, geometry: PoolGeometry):
    """The slots layout's `LoraWeights` (the functional core's stacked adapters) gathered from the pools."""
    from jvila.models.lora import (  # only engines that serve adapters need the LoRA core
        LoraWeights,
        ModuleLora,
    )

    layers = gather_layers(k_pages, v_pages, table, modules=modules, max_rank=max_rank, geometry=geometry)
    return LoraWeights(tuple({m: ModuleLora(*pair) for m, pair in layer.items()} for layer in layers), table.scales)
