"""Train one LoRA adapter with the base model frozen: a minimal optax loop over the functional core's loss.

Only the adapter's A and B are differentiated and updated; the base state is a constant of the
jitted step (never copied or changed). The result is an `Adapter`, ready for `save_peft`,
`merge` or serving.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.lora import Adapter, LoraConfig, LoraWeights, init_adapter, stack_adapters


def _as_layers(adapter: Adapter):
    """The adapter's trainable (a, b) pairs as a pytree: tuple over layers of {module: ModuleLora}, leading n = 1."""
    stacked = stack_adapters([adapter], adapter.rank)
    return stacked.layers, stacked.scales


def _to_adapter(config: LoraConfig, layers) -> Adapter:
    return Adapter(config, {i: {m: (np.asarray(p.a[0]), np.asarray(p.b[0])) for m, p in layer.items()}
                            for i, layer in enumerate(layers) if layer})


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "dropout", "attention"))
def _train_step(graphdef, state, layers, scales, opt_state, tokens, targets, weights, key, *, optimizer, dropout,
                attention):
    def loss_of(trainable):
        return functional.loss(graphdef, state, tokens, targets, weights, attention=attention,
                               lora=LoraWeights(trainable, scales), lora_dropout=dropout,
                               dropout_key=key if dropout > 0 else None)

    loss, grads = jax.value_and_grad(loss_of)(layers)
    updates, opt_state = optimizer.update(grads, opt_state, layers)
    return optax.apply_updates(layers, updates), opt_state, loss


def train_lora(graphdef, state, lora_config: LoraConfig, batches: Iterable, *, learning_rate: float = 1e-3,
               key: jax.Array | None = None, adapter: Adapter | None = None, attention=dense_attention,
               optimizer: optax.GradientTransformation | None = None) -> tuple[Adapter, list[float]]:
    """Train an adapter on `batches` of (tokens, targets, weights) [batch, seq]; returns it and the loss per step.

    Starts from `adapter` if given, else from PEFT's init (A random, B zero: the base model).
    Dropout (`lora_config.dropout`) uses keys drawn from `key`. `optimizer` defaults to AdamW.
    """
    key = jax.random.key(0) if key is None else key
    key, init_key = jax.random.split(key)
    cfg = nnx.merge(graphdef, state).config
    adapter = init_adapter(cfg, lora_config, init_key) if adapter is None else adapter.check(cfg)
    if adapter.config != lora_config:
        raise ValueError("the starting adapter's config differs from lora_config")
    optimizer = optimizer or optax.adamw(learning_rate, weight_decay=0.0)
    layers, scales = _as_layers(adapter)
    opt_state = optimizer.init(layers)
    losses = []
    for tokens, targets, weights in batches:
        key, step_key = jax.random.split(key)
        layers, opt_state, loss = _train_step(graphdef, state, layers, scales, opt_state, jnp.asarray(tokens),
                                              jnp.asarray(targets), jnp.asarray(weights), step_key,
                                              optimizer=optimizer, dropout=lora_config.dropout, attention=attention)
        losses.append(float(loss))
    return _to_adapter(lora_config, layers), losses

