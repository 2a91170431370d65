"""Random adapters for the LoRA tests: every A and B drawn fresh (B is not zero, unlike a fresh PEFT adapter)."""

import jax.numpy as jnp
import numpy as np

from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.lora import Adapter, LoraConfig, module_shape


def random_adapter(cfg, rank, modules, rng, *, alpha=None, use_rslora=False, layers=None, std=0.1) -> Adapter:
    """An adapter of this rank on `modules` of `layers` (default: all), weights ~ N(0, std²)."""
    config = LoraConfig(rank, alpha if alpha is not None else 2.0 * rank, use_rslora=use_rslora,
                        target_modules=tuple(modules))
    weights = {}
    for layer in range(cfg.num_layers) if layers is None else layers:
        weights[layer] = {}
        for module in modules:
            d_in, d_out = module_shape(cfg, module)
            weights[layer][module] = (std * rng.standard_normal((d_in, rank)).astype(np.float32),
                                      std * rng.standard_normal((rank, d_out)).astype(np.float32))
    return Adapter(config, weights)


def greedy_packed(extend_packed, graphdef, state, cfg, prompts, new_tokens, pad_tokens, lora=None, row_adapters=None):
    """Greedy decode of every prompt at once through a jitted `extend_packed`: one packed prefill (pad_tokens >
    rows: the sgmv path), then decode steps (one token per row: the bgmv path).

    Returns the new tokens [rows, new_tokens] and the logits behind them [rows, new_tokens + 1, vocab].
    """
    rows = len(prompts)
    cache = contiguous_cache(cfg, rows, max(map(len, prompts)) + new_tokens, page_size=8)
    tokens = np.zeros(pad_tokens, np.int32)
    flat = np.concatenate(prompts)
    tokens[: len(flat)] = flat
    cu = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int32)
    kwargs = {}
    if lora is not None:
        # Padding tokens carry an arbitrary index: they must not matter.
        per_token = np.full(pad_tokens, -1, np.int32)
        per_token[: len(flat)] = np.repeat(row_adapters, [len(p) for p in prompts])
        kwargs = {"lora": lora, "token_adapters": jnp.asarray(per_token)}
    logits, cache = extend_packed(graphdef, state, jnp.asarray(tokens), jnp.asarray(cu), cache,
                                  attention=dense_attention, **kwargs)
    out, all_logits = [], [logits]
    step_cu = jnp.arange(rows + 1, dtype=jnp.int32)
    for _ in range(new_tokens):
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(nxt))
        if lora is not None:
            kwargs["token_adapters"] = jnp.asarray(row_adapters, jnp.int32)
        logits, cache = extend_packed(graphdef, state, nxt, step_cu, cache, attention=dense_attention, **kwargs)
        all_logits.append(logits)
    return np.stack(out, axis=1), np.stack([np.asarray(x) for x in all_logits], axis=1)
