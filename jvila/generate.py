"""Batched generation on the serving engine: the one generation path of the library and the CLI.

`generate` hands its prompts to a `serving.engine.Engine` sized for them (every prompt runs at
once; its pages are bucketed so that repeated calls reuse the engine step's compilations) and
collects the new ids. A prompt may bring its own input embeddings for some positions (media
spliced in); the rest use the token embeddings.

`_prefill` (a padded, whole-batch prefill on a contiguous cache) stays for the benchmarks that
time the prefill by itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.models import functional

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

    `attention` defaults to the platform's best (`default_attention`). `temperature` ≤ 0 is
    greedy; above 0 prompt i samples with its own seed drawn from `seed`, so a prompt's output
    does not depend on the others in the call.
    `input_embeddings`, if given, has one entry per prompt: None (token embeddings only) or an
    array [len(prompt), hidden] whose rows replace the token embeddings where that prompt's
    `embedding_masks` entry (bool [len(prompt)]; default all True) is set. The ids at replaced
    positions must still be valid ids; they are never embedded.
    """
    from serving.engine import Engine  # serving sits above jvila: imported only when generating
    from serving.request import Request, SamplingParams

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    model = nnx.merge(graphdef, state)  # only to read its static config
    media = _prompt_embeddings(prompts, model.config.hidden_size, input_embeddings, embedding_masks)
    max_context = max(len(p) for p in prompts) + max_new_tokens
    # Room for every prompt at once, so nothing is preempted; a power of two so that calls of
    # similar sizes share the step's compilations (the pool's shape is part of them).
    pages = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
    engine = Engine(graphdef, state, eos_ids=eos_ids, num_pages=bucket(pages, 1), page_size=page_size,
                    max_running=len(prompts), token_budget=max(512, max_context), max_context=max_context,
                    attention=attention, cache_dtype=cache_dtype,
                    # Decode steps keep one shape while sequences finish: one compilation, not one per
                    # row count (each is the whole model).
                    min_step_rows=len(prompts))
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, len(prompts))
    requests = []
    for i, (prompt, (embeddings, mask)) in enumerate(zip(prompts, media)):
        params = SamplingParams(max_tokens=max_new_tokens, temperature=max(float(temperature), 0.0),
                                seed=int(seeds[i]))
        requests.append(Request(str(i), [int(t) for t in prompt], params, input_embeddings=embeddings,
                                embedding_mask=mask))
    out = engine.run_to_completion(requests)
    return [out[str(i)] for i in range(len(prompts))]


def _prompt_embeddings(prompts, hidden: int, input_embeddings, embedding_masks):
    """Per prompt (embeddings [len, hidden], mask [len]) or (None, None), checked against the prompts."""
    if input_embeddings is None:
        if embedding_masks is not None:
            raise ValueError("embedding_masks given without input_embeddings")
        return [(None, None)] * len(prompts)
    if len(input_embeddings) != len(prompts):
        raise ValueError(f"input_embeddings has {len(input_embeddings)} entries for {len(prompts)} prompts")
    if embedding_masks is not None and len(embedding_masks) != len(prompts):
        raise ValueError(f"embedding_masks has {len(embedding_masks)} entries for {len(prompts)} prompts")
    out = []
    for row, (prompt, given) in enumerate(zip(prompts, input_embeddings)):
        if given is None:
            out.append((None, None))
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
        out.append((given, row_mask))
    return out
