"""Batched text generation: one jitted prefill, then one jitted `while_loop` of decode steps.

Each sequence owns one run of pages of the paged cache (the serving engine later hands pages out
from a shared pool through the same cache pytree). Prompt lengths are bucketed to powers of two
so that a handful of compilations serve every request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.models import functional
from jvila.models.kernel_attention import default_attention
from jvila.models.kv_cache import KVCache, contiguous_cache

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two ≥ n (and ≥ minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, lengths, cache, *, attention):
    return functional.extend(graphdef, state, tokens, lengths, cache, attention=attention)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "max_new_tokens", "greedy"))
def _decode_loop(graphdef, state, first_logits, cache: KVCache, eos_ids, rng, temperature, *, attention,
                 max_new_tokens, greedy):
    batch = first_logits.shape[0]

    def sample(logits, key):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, out, done, rng = carry
        rng, key = jax.random.split(rng)
        token = sample(logits, key)
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, eos_ids)
        logits, cache = functional.decode_step(graphdef, state, token, cache, attention=attention)
        return step + 1, logits, cache, out, done, rng

    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    carry = (jnp.int32(0), first_logits, cache, out, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, carry)[3]


def generate(
    graphdef,
    state,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_ids=(),
    temperature: float = 0.0,
    seed: int = 0,
    attention=None,
    page_size: int = 16,
    cache_dtype=None,
) -> list[list[int]]:
    """Complete each prompt (token ids); returns the new ids, each ending at its first EOS (kept).

    `attention` defaults to the platform's best (`default_attention`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    attention = attention or default_attention()
    model = nnx.merge(graphdef, state)  # only to read its static config and dtype
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    width = bucket(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache = contiguous_cache(model.config, len(prompts), width + max_new_tokens, page_size=page_size,
                             dtype=cache_dtype or model.compute_dtype)
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), lengths, cache, attention=attention)
    out = _decode_loop(
        graphdef, state, logits, cache, jnp.asarray(list(eos_ids) or [-1], jnp.int32),
        jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), attention=attention,
        max_new_tokens=max_new_tokens, greedy=temperature <= 0.0,
    )
    return [[int(t) for t in row if t >= 0] for row in np.asarray(out)]

