"""Batched generation: one jitted prefill, then one jitted `while_loop` of decode steps.

Each sequence owns one run of pages of the paged cache (the serving engine later hands pages out
from a shared pool through the same cache pytree). Prompt lengths are bucketed to powers of two
so that a handful of compilations serve every request. A prompt may bring its own input
embeddings for some positions (media spliced in); the rest use the token embeddings.
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
def _prefill(graphdef, state, tokens, lengths, cache, embeddings=None, embedding_mask=None, *, attention):
    """Prefill; where `embedding_mask` [batch, seq] is set, `embeddings` [batch, seq, hidden] replace the tokens'."""
    input_embeddings = None
    if embeddings is not None:
        token_embeddings = nnx.merge(graphdef, state).embed_tokens(tokens)
        input_embeddings = jnp.where(embedding_mask[..., None], embeddings.astype(token_embeddings.dtype),
                                     token_embeddings)
    return functional.extend(graphdef, state, tokens, lengths, cache, attention=attention,
                             input_embeddings=input_embeddings)


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
    input_embeddings=None,
    embedding_masks=None,
) -> list[list[int]]:
    """Complete each prompt (token ids); returns the new ids, each ending at its first EOS (kept).

    `attention` defaults to the platform's best (`default_attention`).
    `input_embeddings`, if given, has one entry per prompt: None (token embeddings only) or an
    array [len(prompt), hidden] whose rows replace the token embeddings where that prompt's
    `embedding_masks` entry (bool [len(prompt)]; default all True) is set. The ids at replaced
    positions must still be valid ids; they are never embedded.
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
    embeddings, embedding_mask = _padded_embeddings(prompts, width, model.config.hidden_size, input_embeddings,
                                                    embedding_masks)
    cache = contiguous_cache(model.config, len(prompts), width + max_new_tokens, page_size=page_size,
                             dtype=cache_dtype or model.compute_dtype)
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), lengths, cache, embeddings, embedding_mask,
                             attention=attention)
    out = _decode_loop(
        graphdef, state, logits, cache, jnp.asarray(list(eos_ids) or [-1], jnp.int32),
        jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), attention=attention,
        max_new_tokens=max_new_tokens, greedy=temperature <= 0.0,
    )
    return [[int(t) for t in row if t >= 0] for row in np.asarray(out)]



def _padded_embeddings(prompts, width: int, hidden: int, input_embeddings, embedding_masks):
    """Per-prompt embeddings and masks padded into [batch, width, hidden] and [batch, width], or (None, None)."""
    if input_embeddings is None:
        if embedding_masks is not None:
            raise ValueError("embedding_masks given without input_embeddings")
        return None, None
    if len(input_embeddings) != len(prompts):
        raise ValueError(f"input_embeddings has {len(input_embeddings)} entries for {len(prompts)} prompts")
    if embedding_masks is not None and len(embedding_masks) != len(prompts):
        raise ValueError(f"embedding_masks has {len(embedding_masks)} entries for {len(prompts)} prompts")
    dtype = next((np.asarray(e).dtype for e in input_embeddings if e is not None), np.dtype(np.float32))
    embeddings = np.zeros((len(prompts), width, hidden), dtype)
    mask = np.zeros((len(prompts), width), bool)
    for row, (prompt, given) in enumerate(zip(prompts, input_embeddings)):
        if given is None:
            continue
        given = np.asarray(given)
        if given.shape != (len(prompt), hidden):
            raise ValueError(f"input_embeddings[{row}] has shape {given.shape}; prompt {row} needs "
                             f"({len(prompt)}, {hidden})")
        row_mask = None if embedding_masks is None else embedding_masks[row]
        row_mask = np.ones(len(prompt), bool) if row_mask is None else np.asarray(row_mask, bool)
        if row_mask.shape != (len(prompt),):
            raise ValueError(f"embedding_masks[{row}] has shape {row_mask.shape}; prompt {row} has "
                             f"{len(prompt)} tokens")
        embeddings[row, : len(prompt)] = given
        mask[row, : len(prompt)] = row_mask
    return jnp.asarray(embeddings), jnp.asarray(mask)
