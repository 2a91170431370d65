"""The train step: one jitted update of the trainable parameters from one global batch.

A `TrainState` splits the model's parameters in two: `trainable` (float32 master weights, the only
part differentiated and handed to the optimizer, so frozen parameters have no optimizer state)
and `frozen` (passed through the step untouched, in whatever dtype they were given). LoRA-only
training keeps the stacked adapter matrices inside `trainable` under the key "lora" (names
"lora.<layer>.<module>.a|b") next to whatever base parameters the mask leaves trainable (usually
none), and their scales in `lora_scales`.

`make_train_step(...)` returns `step(train_state, batch, key) -> (train_state, metrics)`:
- the loss is `jvila.train.forward.batch_loss` (the functional core, NVILA media spliced in);
- `grad_accum` > 1 splits the batch's rows into that many microbatches (rows i, i + n, i + 2n, ...
  so a row-sharded batch splits without moving data) run in a `lax.scan`; the gradients are summed
  weighted by each microbatch's target tokens, which gives exactly the gradient of the whole
  batch's token-weighted mean loss;
- metrics: "loss" (token-weighted mean), "tokens" (sum of weights), "grad_norm" (global norm
  before clipping) and "learning_rate" (of this update), float32 scalars;
- the train state is donated; on a mesh every leaf keeps the placement it came with
  (`place_train_state` places in the canonical form the step returns, so the first step's inputs
  look like every later step's and the step compiles once), batches placed by
  `sharding.mesh.shard_batch` or assembled across processes by the caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jvila.models.lora import Adapter, LoraConfig, LoraWeights, stack_adapters
from jvila.train.forward import TEXT_KEYS, batch_loss
from jvila.train.optimizer import current_learning_rate
from sharding.mesh import shard_like_params
from sharding.rules import DEFAULT_RULES, logical_to_spec

LORA_KEY = "lora"
# optax.tree.norm where this optax has it (global_norm is deprecated there).
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """step (int32 scalar), trainable / frozen parameter States, the optimizer state of `trainable` alone."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    lora_scales: jax.Array | None = None


def _split_by_mask(params, mask):
    """(trainable, frozen) States of `params` by a same-shaped mask of bools."""
    flags = iter(jax.tree.leaves(mask))
    chosen = {_state_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params) if next(flags)}
    return nnx.split_state(params, lambda path, _: tuple(path) in chosen, ...)


def _state_path(leaf_path) -> tuple:
    """A jax key path of a State leaf (ending in the Variable's `.value`) as nnx's filter path of keys."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in leaf_path]
    if keys and isinstance(leaf_path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys = keys[:-1]
    return tuple(keys)


def init_train_state(graphdef, params, optimizer: optax.GradientTransformation, trainable_mask, *,
                     lora: LoraWeights | Adapter | None = None) -> TrainState:
    """A train state for `params` (the whole model's State) with `trainable_mask` (see `trainable_mask`).

    Trainable parameters are cast to float32 (the master copy); frozen ones keep their dtype.
    The state takes over the arrays of `params` (no copy): the step donates the state, so after the
    first step those arrays are gone — use `full_params(train_state)` from then on.
    `lora`: one adapter (an `Adapter`, or `LoraWeights` stacking exactly one) trained alongside.
    """
    del graphdef  # the structure lives in params; kept in the signature for symmetry with the step
    if jax.tree.structure(jax.tree.map(lambda _: 0, params)) != jax.tree.structure(
            jax.tree.map(lambda _: 0, trainable_mask)):
        raise ValueError("trainable_mask must have the structure of params (build it with trainable_mask(params, ...))")
    mask_leaves = jax.tree.leaves(trainable_mask)
    if not all(isinstance(m, (bool, np.bool_)) for m in mask_leaves):
        raise ValueError("trainable_mask leaves must be Python bools")
    if lora is None and not any(mask_leaves):
        raise ValueError("nothing is trainable: the mask freezes every parameter and no LoRA adapter is given")
    trainable, frozen = _split_by_mask(params, trainable_mask)
    trainable = jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable)
    lora_scales = None
    if lora is not None:
        if isinstance(lora, Adapter):
            lora = stack_adapters([lora], lora.rank)
        if not isinstance(lora, LoraWeights) or lora.num_adapters != 1:
            raise ValueError("lora must be one Adapter or LoraWeights stacking exactly one adapter")
        layers = {i: dict(layer) for i, layer in enumerate(lora.layers)}
        layers = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), layers)
        trainable = nnx.State({**trainable, LORA_KEY: layers})
        lora_scales = jnp.asarray(lora.scales, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable), lora_scales=lora_scales)


def _base_and_lora(trainable, lora_scales):
    """The trainable base parameters (a State) and the LoraWeights in `trainable` (None without LoRA)."""
    if lora_scales is None:
        return trainable, None
    base = nnx.State({k: v for k, v in trainable.items() if k != LORA_KEY})
    held = trainable[LORA_KEY]
    layers = tuple(dict(held[i]) for i in range(len(held)))
    return base, LoraWeights(layers, lora_scales)


def full_params(train_state: TrainState):
    """The whole model's parameter State (trainable and frozen merged), e.g. for export or serving."""
    base, _ = _base_and_lora(train_state.trainable, train_state.lora_scales)
    return nnx.merge_state(base, train_state.frozen)


def lora_weights(train_state: TrainState) -> LoraWeights | None:
    """The trained adapter stacked for the functional core (None when the state has no LoRA)."""
    return _base_and_lora(train_state.trainable, train_state.lora_scales)[1]


def lora_adapter(train_state: TrainState, lora_config: LoraConfig) -> Adapter:
    """The trained adapter as an `Adapter` (host arrays), ready for `save_peft` or serving."""
    weights = lora_weights(train_state)
    if weights is None:
        raise ValueError("this train state has no LoRA adapter")
    r = lora_config.rank
    return Adapter(lora_config, {i: {m: (np.asarray(p.a[0, :, :r]), np.asarray(p.b[0, :r, :]))
                                     for m, p in layer.items()} for i, layer in enumerate(weights.layers) if layer})


# ----------------------------------------------------------------------------------------------
# Placement on a mesh
# ----------------------------------------------------------------------------------------------

def canonical_sharding(sharding):
    """A NamedSharding with trailing unsplit dims dropped from its spec (P("fsdp", None) → P("fsdp")), the
    form a jitted step returns: inputs placed so look like the step's outputs, so the step compiles once."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def _place_params(state, mesh: Mesh, rules=DEFAULT_RULES):
    """nnx Variables by their logical axis names; any plain array (LoRA matrices, small) replicated."""
    def place(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            names = leaf.get_metadata().get("out_sharding") or (None,) * value.ndim
            spec = logical_to_spec(names, value.shape, mesh, rules)
            return leaf.replace(jax.device_put(value, canonical_sharding(NamedSharding(mesh, spec))))
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place_train_state(train_state: TrainState, mesh: Mesh, rules=DEFAULT_RULES) -> TrainState:
    """The train state on `mesh`: parameters by the logical-axis rules, optimizer state like its parameters,
    counters replicated. Works with one process or many (every process passes the same values)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = _place_params(train_state.trainable, mesh, rules)
    return TrainState(
        step=jax.device_put(train_state.step, replicated),
        trainable=trainable,
        frozen=_place_params(train_state.frozen, mesh, rules),
        opt_state=shard_like_params(train_state.opt_state, trainable, mesh),
        lora_scales=None if train_state.lora_scales is None else jax.device_put(train_state.lora_scales, replicated),
    )


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def _microbatches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] → [grad_accum, B / grad_accum, ...]; microbatch i holds rows i, i + n, i + 2n, ..."""
    def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {k: split(v) for k, v in batch.items()}


def _check_batch(batch: dict, grad_accum: int) -> None:
    missing = [k for k in TEXT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}; a training batch has {list(TEXT_KEYS)} (+ images for NVILA)")
    shape = tuple(batch["tokens"].shape)
    if len(shape) != 2:
        raise ValueError(f"batch tokens must be [B, L], got shape {shape}")
    for k in TEXT_KEYS:
        if tuple(batch[k].shape) != shape:
            raise ValueError(f"batch entry {k!r} has shape {tuple(batch[k].shape)}, expected {shape} like tokens")
        integer = jnp.issubdtype(batch[k].dtype, jnp.integer)
        if integer != (k != "weights"):
            raise ValueError(f"batch entry {k!r} has dtype {batch[k].dtype}; expected "
                             f"{'a float' if k == 'weights' else 'an integer'} array")
    if shape[0] % grad_accum:
        raise ValueError(f"grad_accum={grad_accum} does not divide the batch's {shape[0]} rows")


def _shardings(tree):
    """The NamedShardings of a tree's leaves (None where a leaf has none), canonical: the step keeps them."""
    return tuple(canonical_sharding(x.sharding) if isinstance(getattr(x, "sharding", None), NamedSharding) else None
                 for x in jax.tree.leaves(tree))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, attention, remat: str = "none",
                    compute_dtype=jnp.float32, grad_accum: int = 1, lora_config: LoraConfig | None = None):
    """step(train_state, batch, key) -> (train_state, metrics), jitted, the train state donated.

    `key` (a jax PRNG key or None) drives LoRA dropout (`lora_config.dropout`); each microbatch
    folds in its index. See the module docstring for what the step computes. `step.compilations()`
    counts the programs compiled so far (states placed by `place_train_state` compile once).
    """
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive int, got {grad_accum!r}")
    from sharding.remat import remat_policy

    remat_policy(remat)  # unknown names fail here, not inside a trace
    dropout = 0.0 if lora_config is None else lora_config.dropout

    def weighted_loss(trainable, frozen, lora_scales, batch, key):
        base, lora = _base_and_lora(trainable, lora_scales)
        params = nnx.merge_state(base, frozen)
        loss, aux = batch_loss(graphdef, params, batch, attention=attention, remat=remat,
                               compute_dtype=compute_dtype, lora=lora, dropout_key=key, lora_dropout=dropout)
        # The sum over target tokens (not the mean): microbatch sums add up to the batch's sum.
        return loss * aux["tokens"], aux["tokens"]

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def update(state: TrainState, batch: dict, key, state_shardings):
        key = None if key is None or dropout == 0 else key
        if grad_accum == 1:
            (total, tokens), grads = grad_fn(state.trainable, state.frozen, state.lora_scales, batch, key)
        else:
            def body(carry, inputs):
                index, micro = inputs
                micro_key = None if key is None else jax.random.fold_in(key, index)
                (total, tokens), grads = grad_fn(state.trainable, state.frozen, state.lora_scales, micro, micro_key)
                acc_total, acc_tokens, acc_grads = carry
                return (acc_total + total, acc_tokens + tokens, jax.tree.map(jnp.add, acc_grads, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (total, tokens, grads), _ = jax.lax.scan(
                body, init, (jnp.arange(grad_accum), _microbatches(batch, grad_accum)))
        # All-zero weights give zero loss and gradients, not NaN.
        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = _global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = dataclasses.replace(state, step=state.step + 1, trainable=trainable, opt_state=opt_state)
        if any(s is not None for s in state_shardings):
            leaves, treedef = jax.tree.flatten(new_state)
            leaves = [x if s is None else jax.lax.with_sharding_constraint(x, s)
                      for x, s in zip(leaves, state_shardings)]
            new_state = jax.tree.unflatten(treedef, leaves)
        metrics = {"loss": total / denominator, "tokens": tokens, "grad_norm": grad_norm.astype(jnp.float32),
                   "learning_rate": current_learning_rate(opt_state)}
        return new_state, metrics

    compiled: dict = {}

    def step(train_state: TrainState, batch: dict, key=None):
        _check_batch(batch, grad_accum)
        shardings = _shardings(train_state)
        fn = compiled.get(shardings)
        if fn is None:
            fn = compiled[shardings] = jax.jit(
                lambda s, b, k: update(s, b, k, shardings), donate_argnums=0)
        return fn(train_state, batch, key)

    def compilations() -> int:
        """How many programs the step has compiled so far (one per distinct input placement or shape)."""
        return sum(fn._cache_size() for fn in compiled.values())

    step.compilations = compilations
    return step
