"""The adapter store: every adapter the server knows, in host memory, checked against the base model.

Adapters arrive from disk (PEFT directories, at start-up or through the load endpoint) or as
objects (tests, training). The store refuses anything the pool could not serve: a rank above the
configured maximum, target modules the model does not have, matrices whose shapes do not fit the
base, a layer count that differs, a path outside the configured adapter root. Device residency
is not its business (see `serving.adapters.resident`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from serving.adapters.paged_layout import module_dims, ordered_modules, pack_stream, stream_layers


class AdapterError(ValueError):
    """An adapter the server cannot take, or a request about adapters it cannot honour."""


class UnknownAdapter(AdapterError):
    """No adapter of that name is loaded."""


class AdapterInUse(AdapterError):
    """The adapter still has requests waiting or running."""


@dataclasses.dataclass(frozen=True)
class StoredAdapter:
    """One adapter as the server keeps it: per-layer {module: (a [in, r], b [r, out])} float32 numpy, and its scale.

    Once the store has checked it, its weights live in `stream` (`paged_layout.pack_stream`: the values its pool
    pages take, in their order), `layers` being views into it: a load then copies the stream as it is.
    """

    rank: int
    scale: float  # alpha / r (or alpha / sqrt(r) for rsLoRA), applied to x @ A @ B
    modules: tuple[str, ...]  # targeted projections, canonical order
    layers: tuple  # per layer: {module: (a, b)}
    path: str | None = None
    stream: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # [layers, values]

    def values(self, dims) -> np.ndarray:
        """The pool-page values [layers, values] of this adapter on a model of these module `dims`."""
        return self.stream if self.stream is not None else pack_stream(dims, self.layers, self.rank, self.modules)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for layer in self.layers for a, b in layer.values())


class AdapterStore:
    """Adapters by name, for one base model."""

    def __init__(self, base_config, *, max_rank: int = 64, root: str | None = None,
                 reader: Callable[[str, object], StoredAdapter] | None = None):
        if max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        self.base_config = base_config
        self.max_rank = max_rank
        self.root = os.path.realpath(root) if root is not None else None
        self._reader = reader
        self._dims = module_dims(base_config)
        self._adapters: dict[str, StoredAdapter] = {}

    # ---- lookup --------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> StoredAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded") from None

    # ---- in and out ----------------------------------------------------------------------------

    def read(self, path: str, *, check_root: bool = True) -> StoredAdapter:
        """An adapter read from a directory and checked, not yet added (slow: call it off the engine thread)."""
        if self._reader is None:
            raise AdapterError("this server has no adapter reader")
        resolved = self.resolve(path) if check_root else os.path.realpath(path)
        if not os.path.isdir(resolved):
            raise AdapterError(f"LoRA adapter path {path!r} is not a directory")
        try:
            adapter = self._reader(resolved, self.base_config)
        except (OSError, KeyError) as e:  # unreadable files
            raise AdapterError(f"cannot read the LoRA adapter at {path!r}: {e}") from None
        except ValueError as e:  # the reader's own refusals: missing files, shapes that do not fit, ...
            raise AdapterError(f"cannot serve the LoRA adapter at {path!r}: {e}") from None
        return dataclasses.replace(self.check(adapter), path=resolved)

    def resolve(self, path: str) -> str:
        """The real path, refused unless it lies under the adapter root."""
        if self.root is None:
            raise AdapterError("loading adapters from paths needs an adapter root (--lora-root)")
        resolved = os.path.realpath(os.path.join(self.root, path))
        if os.path.commonpath([resolved, self.root]) != self.root:
            raise AdapterError(f"LoRA adapter path {path!r} lies outside the adapter root")
        return resolved

    def add(self, name: str, adapter: StoredAdapter) -> None:
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        if name in self._adapters:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded")
        self._adapters[name] = self.check(adapter)

    def remove(self, name: str) -> StoredAdapter:
        adapter = self.get(name)
        del self._adapters[name]
        return adapter

    # ---- checks --------------------------------------------------------------------------------

    def check(self, adapter: StoredAdapter) -> StoredAdapter:
        """The adapter with float32 numpy weights, or AdapterError saying why it cannot be served here."""
        if not 1 <= adapter.rank <= self.max_rank:
            raise AdapterError(f"LoRA rank {adapter.rank} is outside [1, {self.max_rank}] (the maximum is "
                               "--max-lora-rank)")
        if not np.isfinite(adapter.scale):
            raise AdapterError(f"LoRA scale {adapter.scale} is not finite")
        try:
            modules = ordered_modules(adapter.modules)
        except ValueError as e:
            raise AdapterError(str(e)) from None
        if not modules:
            raise AdapterError("the adapter targets no module")
        if len(adapter.layers) != self.base_config.num_layers:
            raise AdapterError(f"the adapter has {len(adapter.layers)} layers; the model has "
                               f"{self.base_config.num_layers}")
        layers = []
        for i, layer in enumerate(adapter.layers):
            if set(layer) != set(modules):
                raise AdapterError(f"layer {i} holds modules {sorted(layer)}, expected {list(modules)}")
            checked = {}
            for m in modules:
                a, b = (np.asarray(w, np.float32) for w in layer[m])
                in_dim, out_dim = self._dims[m]
                if a.shape != (in_dim, adapter.rank) or b.shape != (adapter.rank, out_dim):
                    raise AdapterError(f"layer {i} {m}: A {a.shape} and B {b.shape} do not fit the model's "
                                       f"{m} ({in_dim} -> {out_dim}) at rank {adapter.rank}")
                if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                    raise AdapterError(f"layer {i} {m} holds non-finite values")
                checked[m] = (a, b)
            layers.append(checked)
        if adapter.stream is not None and all(np.may_share_memory(w, adapter.stream) for layer in layers
                                              for pair in layer.values() for w in pair):
            return dataclasses.replace(adapter, modules=modules)  # checked before: its layers view its stream
        stream = pack_stream(self._dims, layers, adapter.rank, modules)
        layers = stream_layers(self._dims, stream, adapter.rank, modules)
        return dataclasses.replace(adapter, modules=modules, layers=layers, stream=stream)


def stored_adapter(adapter, num_layers: int, path: str | None = None) -> StoredAdapter:
    """A `jvila.models.lora.Adapter` as the store keeps it (float32 numpy; untouched layers get zeros)."""
    modules = ordered_modules(adapter.config.target_modules)
    shapes = {}
    for layer in adapter.weights.values():
        for m, (a, b) in layer.items():
            shapes[m] = (a.shape[0], b.shape[1])
    layers = []
    for i in range(num_layers):
        given = adapter.weights.get(i, {})
        layer = {}
        for m in modules:
            if m in given:
                layer[m] = tuple(np.asarray(w, np.float32) for w in given[m])
            elif m in shapes:
                layer[m] = (np.zeros((shapes[m][0], adapter.rank), np.float32),
                            np.zeros((adapter.rank, shapes[m][1]), np.float32))
            else:
                raise AdapterError(f"the adapter targets {m} but holds no weights for it")
        layers.append(layer)
    return StoredAdapter(rank=adapter.rank, scale=float(adapter.config.scale), modules=modules, layers=tuple(layers),
                         path=path)


def read_peft(path: str, base_config) -> StoredAdapter:
    """The store's reader for PEFT directories (adapter_config.json + adapter_model.safetensors)."""
    from jvila.checkpoints.peft_adapter import load_peft

    return stored_adapter(load_peft(path, base_config), base_config.num_layers, path)
