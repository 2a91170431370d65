"""LoRA adapters for the LLM decoder: one adapter's weights, the stacked pytree the functional core takes, merge.

An adapter adds `scale * (x @ A) @ B` to a projection's output, A [in, r] and B [r, out] in the
flat layout Hugging Face uses (heads folded into one axis, heads major: the same order as the
decoder's [in, heads, d] weights reshaped to [in, heads * d]). PEFT's scale is alpha / r, or
alpha / sqrt(r) with rsLoRA.

Adapters enter the model as a separate pytree beside the base state (`LoraWeights`): every
(layer, module) holds all adapters stacked, A [n, in, max_rank] and B [n, max_rank, out], ranks
zero-padded to max_rank, with one scale per adapter. Each token names its adapter (-1 = the base
model alone), so one jitted step serves base and adapted tokens of many adapters together
through the batched kernels of `pallas_kernels.lora` (`bgmv` per token, `sgmv` per contiguous
segment). Which tokens use which adapter travels in a `LoraContext` built by the functional core.

`LoraColumns` is a second layout for a step that mixes ranks: the adapters side by side along the
rank axis, C "columns" with C the sum of their own ranks (each column one rank row: A's column and
B's row, held as Aᵀ [C, in] and B [C, out]), so no adapter is padded to the largest; each token
multiplies by all C columns and keeps its own adapter's (`column_lora`). Serving on CPU uses it
(one pair of matmuls per projection, no gather per token or segment).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jvila.checkpoints.errors import CheckpointError
from jvila.config import LLMConfig
from pallas_kernels.lora import bgmv, segment_token_indices, sgmv
from sharding.rules import DEFAULT_RULES, logical_to_spec

# The decoder's projections an adapter may target, by their Hugging Face names.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


class AdapterError(CheckpointError):
    """An adapter that cannot be used: bad config, shapes that do not fit the base, missing files (a ValueError)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one adapter (PEFT's `r`, `lora_alpha`, `use_rslora`, `target_modules`, `lora_dropout`)."""

    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Llama and Qwen2
    dropout: float = 0.0  # training only

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise AdapterError(f"lora_alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise AdapterError("an adapter needs at least one target module")
        unknown = sorted(set(self.target_modules) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"unknown LoRA target modules {unknown}; supported: {list(TARGET_MODULES)}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def module_shape(cfg: LLMConfig, module: str) -> tuple[int, int]:
    """(in, out) of a projection in the flat layout adapters use."""
    e, m, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
              "gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}
    if module not in shapes:
        raise AdapterError(f"unknown LoRA target module {module!r}; supported: {list(TARGET_MODULES)}")
    return shapes[module]


@dataclasses.dataclass
class Adapter:
    """One adapter: weights {layer: {module: (a [in, r], b [r, out])}} (host or device arrays) and its config.

    A layer or module the adapter does not touch is simply absent.
    """

    config: LoraConfig
    weights: dict[int, dict[str, tuple]]

    @property
    def rank(self) -> int:
        return self.config.rank

    def check(self, cfg: LLMConfig) -> Adapter:
        """Raise AdapterError unless every tensor fits the base model `cfg`; returns self."""
        for layer, modules in self.weights.items():
            if not 0 <= layer < cfg.num_layers:
                raise AdapterError(f"adapter layer {layer} is outside the base model's {cfg.num_layers} layers")
            for module, (a, b) in modules.items():
                if module not in self.config.target_modules:
                    raise AdapterError(f"layer {layer} has weights for {module!r}, which is not among the "
                                       f"adapter's target modules {list(self.config.target_modules)}")
                d_in, d_out = module_shape(cfg, module)
                want_a, want_b = (d_in, self.rank), (self.rank, d_out)
                if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                    raise AdapterError(f"layer {layer} {module}: lora A {tuple(a.shape)} / B {tuple(b.shape)} do not "
                                       f"fit the base model (want A {want_a}, B {want_b})")
        return self


def init_adapter(cfg: LLMConfig, lora_config: LoraConfig, key: jax.Array, *, dtype=jnp.float32) -> Adapter:
    """A fresh adapter on every layer's target modules: A Kaiming-uniform, B zero (PEFT's init: starts as the base)."""
    weights = {}
    for layer in range(cfg.num_layers):
        weights[layer] = {}
        for module in lora_config.target_modules:
            key, sub = jax.random.split(key)
            d_in, d_out = module_shape(cfg, module)
            # kaiming_uniform(a=sqrt(5)) on a [r, in] matrix, as torch.nn.Linear and PEFT draw it: bound 1/sqrt(in).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(sub, (d_in, lora_config.rank), jnp.float32, -bound, bound).astype(dtype)
            weights[layer][module] = (a, jnp.zeros((lora_config.rank, d_out), dtype))
    return Adapter(lora_config, weights)


class ModuleLora(NamedTuple):
    a: jax.Array  # [n, in, max_rank]
    b: jax.Array  # [n, max_rank, out]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """Adapters stacked for the functional core: `layers[i][module]` = ModuleLora, `scales` [n] float32.

    A (layer, module) no adapter targets is absent from `layers[i]` (costs nothing); an adapter that
    does not target a present one has zeros there. Ranks below max_rank are zero-padded.
    """

    layers: tuple[dict[str, ModuleLora], ...]
    scales: jax.Array

    @property
    def num_adapters(self) -> int:
        return self.scales.shape[0]

    @property
    def max_rank(self) -> int:
        return next(m.a.shape[-1] for layer in self.layers for m in layer.values())


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["layers", "column_adapters", "column_scales", "tail_columns"],
                   meta_fields=["num_adapters", "tail_start"])
@dataclasses.dataclass(frozen=True)
class LoraColumns:
    """Adapters side by side along the rank axis: `layers[i][module]` = ModuleLora(a [C, in], b [C, out]).

    `a` is A transposed: each column (rank row) is a contiguous row of both, as in the page pool, so a
    working set copies and places columns as rows (far cheaper than strided columns). Column c
    belongs to adapter `column_adapters[c]` (-1: a padding column no token uses) and carries its
    scale `column_scales[c]`; adapter j's columns are its own rank's, never padded to another's.
    A module an adapter does not target has zeros in its columns; a (layer, module) no adapter
    targets is absent (costs nothing).
    Every token multiplies all C columns. With `tail_columns` [C'] (indices into the C columns; C or more: a
    zero padding column), tokens from `tail_start` on multiply just those: a step whose long rows use a
    few of the set's adapters (a prompt beside many decoding rows) then spends C' columns, not C, on most
    of its tokens. Each such token's adapter must own columns among them.
    """

    layers: tuple[dict[str, ModuleLora], ...]
    column_adapters: jax.Array  # [C] int32
    column_scales: jax.Array  # [C] float32
    # Static: a bound on the adapter indices (tokens' lie in [-1, num_adapters)); column_stack gives the number of
    # adapters, serving's working set its column count (its step compiles per column bucket, not per adapter count).
    num_adapters: int
    tail_columns: jax.Array | None = None  # [C'] int32
    tail_start: int | None = None  # static

    @property
    def num_columns(self) -> int:
        return self.column_adapters.shape[0]


def column_stack(adapters: list[Adapter], base_config: LLMConfig, *, num_columns: int | None = None,
                 target_modules: tuple[str, ...] | None = None, dtype=jnp.float32) -> LoraColumns:
    """Adapters (index i = adapters[i]) side by side in a `LoraColumns`, padded to `num_columns` columns."""
    if not adapters:
        raise AdapterError("column_stack needs at least one adapter")
    for adapter in adapters:
        adapter.check(base_config)
    modules = target_modules or tuple(m for m in TARGET_MODULES if any(m in a.config.target_modules for a in adapters))
    total = sum(a.rank for a in adapters)
    num_columns = total if num_columns is None else num_columns
    if num_columns < total:
        raise AdapterError(f"{num_columns} columns cannot hold adapters of total rank {total}")
    owner = np.full((num_columns,), -1, np.int32)
    scales = np.zeros((num_columns,), np.float32)
    starts = np.cumsum([0] + [a.rank for a in adapters])
    for i, adapter in enumerate(adapters):
        owner[starts[i]: starts[i + 1]] = i
        scales[starts[i]: starts[i + 1]] = adapter.config.scale
    layers = []
    for layer in range(base_config.num_layers):
        entry = {}
        for module in modules:
            d_in, d_out = module_shape(base_config, module)
            a, b = np.zeros((num_columns, d_in), np.float32), np.zeros((num_columns, d_out), np.float32)
            for i, adapter in enumerate(adapters):
                pair = adapter.weights.get(layer, {}).get(module)
                if pair is not None:
                    a[starts[i]: starts[i + 1]] = np.asarray(pair[0], np.float32).T
                    b[starts[i]: starts[i + 1]] = np.asarray(pair[1], np.float32)
            entry[module] = ModuleLora(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
        layers.append(entry)
    return LoraColumns(tuple(layers), jnp.asarray(owner), jnp.asarray(scales), len(adapters))


def _padded(adapter: Adapter, layer: int, module: str, max_rank: int, shape, dtype):
    """This adapter's (a, b) padded to max_rank, or zeros where it has none."""
    d_in, d_out = shape
    a = np.zeros((d_in, max_rank), np.float32)
    b = np.zeros((max_rank, d_out), np.float32)
    pair = adapter.weights.get(layer, {}).get(module)
    if pair is not None:
        r = adapter.rank
        if tuple(pair[0].shape) != (d_in, r) or tuple(pair[1].shape) != (r, d_out):
            raise AdapterError(f"layer {layer} {module}: lora A {tuple(pair[0].shape)} / B {tuple(pair[1].shape)} "
                               f"do not fit (want A {(d_in, r)}, B {(r, d_out)})")
        a[:, :r] = np.asarray(pair[0], np.float32)
        b[:r, :] = np.asarray(pair[1], np.float32)
    return a.astype(dtype), b.astype(dtype)


def stack_adapters(adapters: list[Adapter], max_rank: int, *, base_config: LLMConfig | None = None,
                   target_modules: tuple[str, ...] | None = None, dtype=jnp.float32) -> LoraWeights:
    """Stack adapters (slot i = adapters[i]) into the pytree the functional core takes.

    Modules: `target_modules`, or the union of the adapters'. With `base_config`, every adapter is
    checked against it and `layers` covers all of its layers; else dims come from the adapters.
    """
    if not adapters:
        raise AdapterError("stack_adapters needs at least one adapter")
    for i, adapter in enumerate(adapters):
        if adapter.rank > max_rank:
            raise AdapterError(f"adapter {i} has rank {adapter.rank}, above the maximum rank {max_rank}")
        if base_config is not None:
            adapter.check(base_config)
    modules = target_modules or tuple(m for m in TARGET_MODULES if any(m in a.config.target_modules for a in adapters))
    for i, adapter in enumerate(adapters):
        dropped = sorted({m for layer in adapter.weights.values() for m in layer} - set(modules))
        if dropped:
            raise AdapterError(f"adapter {i} has weights for {dropped}, outside the stacked modules {list(modules)}")
    if base_config is not None:
        num_layers = base_config.num_layers
    else:
        num_layers = 1 + max((layer for a in adapters for layer in a.weights), default=-1)
    layers = []
    for layer in range(num_layers):
        entry = {}
        for module in modules:
            if base_config is not None:
                shape = module_shape(base_config, module)
            else:
                present = [a.weights[layer][module] for a in adapters if module in a.weights.get(layer, {})]
                if not present:
                    continue
                shape = (present[0][0].shape[0], present[0][1].shape[1])
            pairs = [_padded(a, layer, module, max_rank, shape, dtype) for a in adapters]
            entry[module] = ModuleLora(jnp.asarray(np.stack([p[0] for p in pairs])),
                                       jnp.asarray(np.stack([p[1] for p in pairs])))
        layers.append(entry)
    scales = jnp.asarray([a.config.scale for a in adapters], jnp.float32)
    return LoraWeights(tuple(layers), scales)


def empty_slots(cfg: LLMConfig, num_slots: int, max_rank: int, target_modules=TARGET_MODULES, *,
                dtype=jnp.float32) -> LoraWeights:
    """`num_slots` all-zero adapter slots on every layer (fill them with `set_slot`)."""
    layers = []
    for _ in range(cfg.num_layers):
        entry = {}
        for module in target_modules:
            d_in, d_out = module_shape(cfg, module)
            entry[module] = ModuleLora(jnp.zeros((num_slots, d_in, max_rank), dtype),
                                       jnp.zeros((num_slots, max_rank, d_out), dtype))
        layers.append(entry)
    return LoraWeights(tuple(layers), jnp.zeros((num_slots,), jnp.float32))


def set_slot(weights: LoraWeights, slot: int, adapter: Adapter) -> LoraWeights:
    """`weights` with slot `slot` holding `adapter` (padded; modules it lacks zeroed)."""
    if not 0 <= slot < weights.num_adapters:
        raise AdapterError(f"slot {slot} is outside the {weights.num_adapters} slots")
    if adapter.rank > weights.max_rank:
        raise AdapterError(f"adapter rank {adapter.rank} is above the maximum rank {weights.max_rank}")
    missing = sorted(set(adapter.config.target_modules) - {m for layer in weights.layers for m in layer})
    if missing and any(adapter.weights.values()):
        raise AdapterError(f"the slots hold no room for target modules {missing}")
    layers = []
    for i, layer in enumerate(weights.layers):
        entry = {}
        for module, m in layer.items():
            a, b = _padded(adapter, i, module, weights.max_rank, (m.a.shape[1], m.b.shape[2]), m.a.dtype)
            entry[module] = ModuleLora(m.a.at[slot].set(a), m.b.at[slot].set(b))
        layers.append(entry)
    return LoraWeights(tuple(layers), weights.scales.at[slot].set(adapter.config.scale))


# ----------------------------------------------------------------------------- tensor parallelism


def module_axes(cfg: LLMConfig, module: str):
    """Logical names of (a [n, in, r], b [n, r, out]) and, per axis, the size that decides whether it can split.

    A head-folded dimension splits only as its base weight does, i.e. when the head count divides.
    """
    heads = {"q_proj": ("q_heads", cfg.num_heads), "k_proj": ("kv_heads", cfg.num_kv_heads),
             "v_proj": ("kv_heads", cfg.num_kv_heads), "gate_proj": ("mlp", cfg.intermediate_size),
             "up_proj": ("mlp", cfg.intermediate_size)}
    if module in heads:  # column-parallel: B splits on out, A is replicated
        name, size = heads[module]
        return (("lora_adapters", "lora_embed", "lora_rank"), ("lora_adapters", "lora_rank", name)), (None, size)
    if module == "o_proj":  # row-parallel: A splits on in, B is replicated
        return (("lora_adapters", "q_heads", "lora_rank"), ("lora_adapters", "lora_rank", "lora_embed")), \
            (cfg.num_heads, None)
    if module == "down_proj":
        return (("lora_adapters", "mlp", "lora_rank"), ("lora_adapters", "lora_rank", "lora_embed")), \
            (cfg.intermediate_size, None)
    raise AdapterError(f"unknown LoRA target module {module!r}; supported: {list(TARGET_MODULES)}")


def partition_specs(weights: LoraWeights, cfg: LLMConfig, mesh, rules=None) -> LoraWeights:
    """A LoraWeights of PartitionSpecs: each A/B split as the rule table says (see sharding/rules.py)."""
    rules = DEFAULT_RULES if rules is None else rules
    layers = []
    for layer in weights.layers:
        entry = {}
        for module, m in layer.items():
            (a_names, b_names), (a_split, b_split) = module_axes(cfg, module)
            # The split side is checked against the base weight's size (heads, not heads * head_dim).
            a_shape = (m.a.shape[0], a_split or m.a.shape[1], m.a.shape[2])
            b_shape = (m.b.shape[0], m.b.shape[1], b_split or m.b.shape[2])
            entry[module] = ModuleLora(logical_to_spec(a_names, a_shape, mesh, rules),
                                       logical_to_spec(b_names, b_shape, mesh, rules))
        layers.append(entry)
    return LoraWeights(tuple(layers), PartitionSpec())


def shard_lora(weights: LoraWeights, cfg: LLMConfig, mesh, rules=None) -> LoraWeights:
    """Place stacked adapters on `mesh` to follow the base weights' split (`partition_specs`)."""
    specs = partition_specs(weights, cfg, mesh, rules)
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), weights, specs)


# ----------------------------------------------------------------------------- applying in the model


@dataclasses.dataclass(frozen=True)
class LoraContext:
    """What one forward pass needs to add the adapters: built by the functional core, read by the model.

    Tokens are the model's [batch, seq] flattened row-major; `token_adapters` [N] names each
    one's adapter. With contiguous segments of one adapter each (`segment_starts` [S + 1],
    `segment_adapters` [S]) the kernels run `sgmv`, else `bgmv`.
    `dropout_key` (training) drops input features of the adapted path at `dropout_rate`.
    `implementation`: "dense" (`dense_lora`), "segment_dense" (`segment_dense_lora`), "gather" (per-token
    gathered einsum), or a kernel implementation of `pallas_kernels.lora`; None = on CPU the cheapest
    of those for the step's shape (`_cpu_implementation`), elsewhere the kernels' dispatch.
    With `weights` a `LoraColumns`, every module runs `column_lora` (segments and implementation unused).
    """

    weights: LoraWeights | LoraColumns
    token_adapters: jax.Array
    segment_starts: jax.Array | None = None
    segment_adapters: jax.Array | None = None
    dropout_rate: float = 0.0
    dropout_key: jax.Array | None = None
    implementation: str | None = None

    def layer(self, index: int) -> LayerLora | None:
        if index >= len(self.weights.layers) or not self.weights.layers[index]:
            return None
        key = None if self.dropout_key is None else jax.random.fold_in(self.dropout_key, index)
        return LayerLora(self, self.weights.layers[index], key)


@dataclasses.dataclass(frozen=True)
class LayerLora:
    """One layer's adapters; the decoder calls `add(module, x, y)` after each targeted projection."""

    context: LoraContext
    modules: dict[str, ModuleLora]
    dropout_key: jax.Array | None

    def add(self, module: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """y [..., out] + this module's adapter on x [..., in], per token; y unchanged if the module has none."""
        m = self.modules.get(module)
        if m is None:
            return y
        ctx = self.context
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if self.dropout_key is not None and ctx.dropout_rate > 0:
            key = jax.random.fold_in(self.dropout_key, TARGET_MODULES.index(module))
            keep = jax.random.bernoulli(key, 1.0 - ctx.dropout_rate, x2.shape)
            x2 = jnp.where(keep, x2 / (1.0 - ctx.dropout_rate), 0).astype(x2.dtype)
        if isinstance(ctx.weights, LoraColumns):
            return columns_lora(y2, x2, m, ctx.token_adapters, ctx.weights).reshape(y.shape)
        implementation = ctx.implementation
        if implementation is None and jax.default_backend() == "cpu":
            implementation = _cpu_implementation(m.a.shape[0], x2.shape[0], ctx.segment_adapters)
        if implementation == "dense":
            out = dense_lora(y2, x2, m.a, m.b, ctx.token_adapters, ctx.weights.scales)
        elif implementation == "segment_dense":
            out = segment_dense_lora(y2, x2, m.a, m.b, ctx.segment_starts, ctx.segment_adapters, ctx.weights.scales)
        elif implementation == "gather":
            out = bgmv(y2, x2, m.a, m.b, ctx.token_adapters, ctx.weights.scales, implementation="xla")
        elif ctx.segment_starts is not None:
            out = sgmv(y2, x2, m.a, m.b, ctx.segment_starts, ctx.segment_adapters, ctx.weights.scales,
                       implementation=implementation)
        else:
            out = bgmv(y2, x2, m.a, m.b, ctx.token_adapters, ctx.weights.scales, implementation=implementation)
        return out.reshape(y.shape)


# On CPU the kernels' reference gathers every token's A and B ([T, in, r] and [T, r, out]): memory
# traffic that made a 256-token prefill 4x slower than the base model (SmolLM2-135M's widths, 8
# adapters of rank 16). Multiplying by every adapter and masking reads each adapter once, but its
# work grows with the number of adapters: with many slots and few rows it computes mostly adapters
# no token uses. So on CPU: a step whose rows are segments multiplies by just the segments'
# adapters (gathered once per segment, not per token); a per-token step with fewer tokens than
# slots (decode) gathers per token; otherwise every adapter, up to DENSE_MAX_ADAPTERS.
DENSE_MAX_ADAPTERS = 64


def _cpu_implementation(num_adapters: int, num_tokens: int, segment_adapters) -> str | None:
    if segment_adapters is not None and segment_adapters.shape[0] < num_adapters:
        return "segment_dense"
    if segment_adapters is None and num_tokens < num_adapters:
        return "gather"
    return "dense" if num_adapters <= DENSE_MAX_ADAPTERS else None


def segment_dense_lora(y, x, lora_a, lora_b, segment_starts, segment_adapters, scales):
    """`sgmv`'s semantics through `dense_lora` over the segments' own adapters (one gather per segment).

    Work T x S x in x r for S segments, instead of T x n for all n adapters.
    """
    num_adapters, num_segments = lora_a.shape[0], segment_adapters.shape[0]
    used = (segment_adapters >= 0) & (segment_adapters < num_adapters)
    adapter = jnp.where(used, segment_adapters, 0)
    # Each token's segment (-1 outside every segment): the segments' own adapters are indexed by segment.
    segment = segment_token_indices(segment_starts, jnp.arange(num_segments, dtype=jnp.int32), x.shape[0])
    return dense_lora(y, x, lora_a[adapter], lora_b[adapter], segment, jnp.where(used, scales[adapter], 0.0))


def dense_lora(y, x, lora_a, lora_b, indices, scales):
    """`bgmv`'s semantics by dense matmuls against all n adapters, masked per token (fp32 accumulation).

    y [T, out] + (x @ A[i]) @ B[i] * scales[i] for i = indices[t]; rows with i outside [0, n) unchanged.
    """
    n = lora_a.shape[0]
    xa = jnp.einsum("ti,nir->tnr", x, lora_a, preferred_element_type=jnp.float32)
    weight = jnp.where(indices[:, None] == jnp.arange(n, dtype=indices.dtype)[None, :], scales[None, :], 0.0)
    delta = jnp.einsum("tnr,nro->to", xa * weight[..., None], lora_b.astype(jnp.float32),
                       preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + delta).astype(y.dtype)


def column_lora(y, x, lora_a, lora_b, indices, column_adapters, column_scales):
    """`bgmv`'s semantics over adapters laid side by side (`LoraColumns`): products in the adapters' dtype,
    accumulated in float32.

    lora_a is Aᵀ [C, in], lora_b B [C, out]. y [T, out] + ((x @ A) * w) @ B with w[t, c] =
    column_scales[c] where column c belongs to token t's adapter indices[t], else 0; rows with a
    negative index unchanged. Work T x C x (in + out) for C the working set's total rank: each
    adapter at its own rank, read once per step.
    Adapters narrower than x (bfloat16 beside a float32 model) take x and x @ A at their width:
    casting the adapters up instead would copy them at every step.
    """
    xa = jnp.einsum("ti,ci->tc", x.astype(lora_a.dtype), lora_a, preferred_element_type=jnp.float32)
    own = (indices[:, None] == column_adapters[None, :]) & (indices[:, None] >= 0)
    weight = jnp.where(own, column_scales[None, :], 0.0)
    delta = jnp.einsum("tc,co->to", (xa * weight).astype(lora_b.dtype), lora_b, preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + delta).astype(y.dtype)


def columns_lora(y, x, module: ModuleLora, indices, weights: LoraColumns):
    """`column_lora` over a `LoraColumns` set's module: tokens past `weights.tail_start` on its tail columns alone."""
    start = weights.tail_start
    if weights.tail_columns is None or start >= x.shape[0]:
        return column_lora(y, x, module.a, module.b, indices, weights.column_adapters, weights.column_scales)

    def tail(values, fill):
        return jnp.take(values, weights.tail_columns, axis=0, mode="fill", fill_value=fill)

    head = column_lora(y[:start], x[:start], module.a, module.b, indices[:start], weights.column_adapters,
                       weights.column_scales)
    rest = column_lora(y[start:], x[start:], tail(module.a, 0), tail(module.b, 0), indices[start:],
                       tail(weights.column_adapters, -1), tail(weights.column_scales, 0))
    return jnp.concatenate([head, rest])


def per_token_context(weights: LoraWeights, token_adapters, num_tokens: int, **kwargs) -> LoraContext:
    """Context for `num_tokens` flattened tokens, one adapter index each (None: all adapter 0, n must be 1)."""
    if token_adapters is None:
        if weights.num_adapters != 1:
            raise ValueError(f"with {weights.num_adapters} adapters, token_adapters must say which each token uses")
        token_adapters = jnp.zeros((num_tokens,), jnp.int32)
    token_adapters = jnp.asarray(token_adapters, jnp.int32).reshape(-1)
    if token_adapters.shape[0] != num_tokens:
        raise ValueError(f"token_adapters has {token_adapters.shape[0]} entries for {num_tokens} tokens")
    return LoraContext(weights, token_adapters, **kwargs)


def padded_batch_context(weights: LoraWeights, token_adapters, batch: int, seq: int, **kwargs) -> LoraContext:
    """Context for a [batch, seq] token array: token_adapters [batch, seq] (per token) or [batch] (per row).

    Per row with seq > 1 uses `sgmv` over the rows (each row a segment); otherwise `bgmv`.
    """
    if token_adapters is not None:
        token_adapters = jnp.asarray(token_adapters, jnp.int32)
        if token_adapters.shape == (batch,) and seq > 1:
            starts = jnp.arange(batch + 1, dtype=jnp.int32) * seq
            return LoraContext(weights, jnp.repeat(token_adapters, seq), segment_starts=starts,
                               segment_adapters=token_adapters, **kwargs)
        if token_adapters.shape == (batch,):
            token_adapters = token_adapters[:, None]
        if token_adapters.shape != (batch, seq):
            raise ValueError(f"token_adapters {token_adapters.shape} must be [batch] or [batch, seq] = {(batch, seq)}")
    return per_token_context(weights, token_adapters, batch * seq, **kwargs)


def packed_context(weights: LoraWeights, token_adapters, cu_q_lens, num_tokens: int, **kwargs) -> LoraContext:
    """Context for packed tokens [T] whose rows are cu_q_lens segments; token_adapters [T].

    All tokens of a row must share one adapter (a row is one request). A decode-shaped step
    (T <= rows) runs `bgmv` per token; a longer one `sgmv` with one segment per row.
    """
    num_rows = cu_q_lens.shape[0] - 1
    context = per_token_context(weights, token_adapters, num_tokens, **kwargs)
    if num_tokens <= num_rows:
        return context
    first = jnp.clip(cu_q_lens[:-1], 0, num_tokens - 1)
    return dataclasses.replace(context, segment_starts=cu_q_lens.astype(jnp.int32),
                               segment_adapters=context.token_adapters[first])


# ----------------------------------------------------------------------------- merge / unmerge


_BLOCK = {m: "attn" for m in ATTENTION_MODULES} | {m: "mlp" for m in MLP_MODULES}


def _fold(graphdef, state, adapter: Adapter, sign: float):
    cfg = nnx.merge(graphdef, state).config
    adapter.check(cfg)
    new = jax.tree.map(lambda x: x, state)  # a new tree of the same variables: the caller's stays intact
    scale = sign * adapter.config.scale
    for layer, modules in adapter.weights.items():
        for module, (a, b) in modules.items():
            var = new["layers"][layer][_BLOCK[module]][module]
            w = var.get_value()
            delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            updated = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
            new["layers"][layer][_BLOCK[module]][module] = var.replace(updated)
    return new


def merge(graphdef, state, adapter: Adapter):
    """The base state with `scale * A @ B` added to every targeted weight (a new state; `state` is untouched)."""
    return _fold(graphdef, state, adapter, 1.0)


def unmerge(graphdef, state, adapter: Adapter):
    """The inverse of `merge`: subtracts the adapter again (exact up to floating-point rounding)."""
    return _fold(graphdef, state, adapter, -1.0)
