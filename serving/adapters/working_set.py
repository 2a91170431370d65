"""One step's adapters: the per-token adapter index and the slot table the jitted step gathers from.

Rows of a step may each use a different adapter (or none). The adapters of the step's rows get
slots 0..n-1 in order of first appearance; a token's index is its row's slot, -1 for the base
model. Slot count, page-table width and the rank are rounded up to powers of two, so the number
of step compilations stays small; padded slots have rank 0 and gather nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.adapters.paged_layout import (
    MODULES,
    PoolGeometry,
    SlotTable,
    adapter_streams,
    gather_module,
)

MIN_RANK = 8  # smallest rank bucket (S-LoRA's smallest common rank)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class LoraBatch:
    """What a step needs for LoRA: device-bound arrays plus the static choices that shape the compile."""

    token_adapters: np.ndarray  # [T] int32: slot of each packed token's adapter, -1 = base
    table: SlotTable
    modules: tuple[str, ...]  # union of the slots' targeted modules (static)
    max_rank: int  # working-set rank R (static)
    names: tuple[str, ...]  # adapter of each live slot, for observation


def build_lora_batch(row_adapters, row_tokens, store, resident, geometry: PoolGeometry) -> LoraBatch | None:
    """row_adapters [B] (name or None), row_tokens [B] (tokens each row feeds) → the step's LoraBatch (None: no LoRA)."""
    names: list[str] = []
    for name in row_adapters:
        if name is not None and name not in names:
            names.append(name)
    if not names:
        return None
    slot = {name: i for i, name in enumerate(names)}
    token_adapters = np.concatenate(
        [np.full((n,), -1 if a is None else slot[a], np.int32) for a, n in zip(row_adapters, row_tokens)])
    adapters = [store.get(n) for n in names]
    n = _pow2(len(names))
    pages = [resident.pages_of(name) for name in names]
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
    modules = tuple(m for m in MODULES if any(m in a.modules for a in adapters))
    max_rank = _pow2(max(a.rank for a in adapters), MIN_RANK)
    return LoraBatch(token_adapters, table, modules, max_rank, tuple(names))


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


def gather_lora_weights(k_pages, v_pages, table: SlotTable, *, modules, max_rank: int, geometry: PoolGeometry):
    """Traced: the step's `LoraWeights` (the functional core's stacked adapters) gathered from the pools."""
    from jvila.models.lora import (  # only steps that serve adapters need the LoRA core
        LoraWeights,
        ModuleLora,
    )

    layers = gather_layers(k_pages, v_pages, table, modules=modules, max_rank=max_rank, geometry=geometry)
    return LoraWeights(tuple({m: ModuleLora(*pair) for m, pair in layer.items()} for layer in layers), table.scales)
