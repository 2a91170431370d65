"""On-device choice of each row's next token: greedy, temperature, top-k, top-p, per-request seeds,
and the log-probabilities the API reports.

Every row carries its own parameters, so one jitted step serves a batch that mixes greedy and
sampled requests. A row's random key is `fold_in(key(seed), output_index)`: its draws depend on
its own seed and on how many tokens it has produced, never on which other requests share the
batch or where in the batch it sits.

Order of the transforms (as Hugging Face's and vLLM's samplers): logits / temperature, then
top-k, then top-p over what top-k kept (renormalised), then a Gumbel-max draw, which is an exact
sample of the softmax of the kept logits. Ties at the top-k or top-p threshold keep every tied
token. Reported logprobs are those of the model itself (log_softmax of the raw logits), not of
the tempered and truncated distribution, as the OpenAI API reports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters as device arrays (all [rows])."""

    temperature: jax.Array  # float32; 0 = greedy (argmax)
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32 in (0, 1]; 1 = off
    seeds: jax.Array  # uint32; the request's seed
    output_index: jax.Array  # int32; index of the token being chosen in the request's output

    @classmethod
    def greedy(cls, rows: int) -> SamplingArrays:
        zeros = jnp.zeros((rows,), jnp.int32)
        return cls(jnp.zeros((rows,), jnp.float32), zeros, jnp.ones((rows,), jnp.float32),
                   jnp.zeros((rows,), jnp.uint32), zeros)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [rows] int32
    logprobs: jax.Array  # [rows] float32: the chosen token's model logprob
    top_ids: jax.Array  # [rows, num_top] int32, most likely first
    top_logprobs: jax.Array  # [rows, num_top] float32


def row_keys(seeds: jax.Array, output_index: jax.Array) -> jax.Array:
    """One key per row: fold_in(key(seed), output_index)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, output_index)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values are (sign-magnitude → two's complement)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key tau with sum(weights[keys >= tau]) >= target (the row's minimum key
    if none reaches it). Bisection over the int32 keys: 32 rounds find it exactly."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        reaches = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0), axis=-1) >= target
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (keys.min(axis=-1), keys.max(axis=-1)))
    return lo


def truncate(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside a row's top-k / top-p support to -inf. scaled [rows, vocab].

    Top-k keeps the tokens at or above the k-th largest logit; top-p then keeps the smallest set
    of the most likely of those whose renormalised mass reaches p (the most likely token always
    stays). Both thresholds are found by bisection, not by sorting the vocabulary: on a CPU a
    sort of 8 x 49k logits costs ~10x more than 2 x 32 masked sums.
    """
    vocab = scaled.shape[-1]
    keys = _ordered_keys(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = _largest_key_reaching(keys, jnp.ones((), jnp.int32), k)
    in_top_k = keys >= kth[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
    # p = 1 keeps all of top-k outright: rounding can leave the total mass just under 1.
    cut = _largest_key_reaching(keys, probs, top_p)
    keep = in_top_k & ((keys >= cut[:, None]) | (top_p[:, None] >= 1.0))
    return jnp.where(keep, scaled, -jnp.inf)


def sample(logits: jax.Array, params: SamplingArrays, *, num_top: int = 0) -> SampleOutput:
    """logits [rows, vocab] float32 → each row's next token and its logprobs (`num_top` static)."""
    logits = logits.astype(jnp.float32)
    greedy = params.temperature <= 0.0
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        scaled = logits / jnp.where(greedy, 1.0, params.temperature)[:, None]
        # Truncation costs more than the rest of sampling: only when a row asks for it.
        truncating = jnp.any(~greedy & ((params.top_k > 0) | (params.top_p < 1.0)))
        scaled = jax.lax.cond(truncating, lambda s: truncate(s, params.top_k, params.top_p), lambda s: s, scaled)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(
            row_keys(params.seeds, params.output_index))
        return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

    # A greedy-only batch never draws noise.
    drawn = jax.lax.cond(jnp.all(greedy), lambda _: argmax, draw, None)
    tokens = jnp.where(greedy, argmax, drawn)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    if num_top > 0:
        top_logprobs, top_ids = jax.lax.top_k(log_probs, num_top)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
