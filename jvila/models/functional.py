"""The functional core: pure functions over (graphdef, state) shared by training and serving.

Each function merges the model inside (cheap at trace time) and is meant to be called under
`jax.jit` with `graphdef` and `attention` static and the cache donated. None keeps state.

LoRA: `lora` (stacked adapters, `jvila.models.lora.LoraWeights`) is a pytree beside the base state;
`token_adapters` says which adapter each token uses (-1 = the base alone). With `lora=None` the
functions trace exactly the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jvila.models.attention import Attention
from jvila.models.kv_cache import KVCache, packed_layout
from jvila.models.lora import LoraWeights, packed_context, padded_batch_context


def hidden_states(graphdef, state, tokens, *, attention: Attention, positions=None, segment_ids=None,
                  input_embeddings=None, lora: LoraWeights | None = None, token_adapters=None,
                  lora_dropout: float = 0.0, dropout_key=None, remat: str = "none"):
    """Cache-free forward: tokens [batch, seq] → final hidden states [batch, seq, hidden].

    `input_embeddings`, if given, replaces the token embeddings (media are spliced in there).
    `token_adapters`: [batch, seq] (per token) or [batch] (per row); None with one adapter = all use it.
    `dropout_key` (training) turns on LoRA dropout at rate `lora_dropout`.
    `remat` names a `sharding.remat` policy applied to each decoder layer (training).
    """
    model = nnx.merge(graphdef, state)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed_tokens(tokens) if input_embeddings is None else input_embeddings
    if lora is None:
        hidden, _ = model(x, positions=positions, attention=attention, segment_ids=segment_ids, remat=remat)
        return hidden
    # Gradients flow through the kernels' jnp paths only: the Pallas kernels have no VJP.
    context = padded_batch_context(lora, token_adapters, *tokens.shape, dropout_rate=lora_dropout,
                                   dropout_key=dropout_key,
                                   implementation=None if jax.default_backend() == "cpu" else "xla")
    hidden, _ = model(x, positions=positions, attention=attention, segment_ids=segment_ids, lora=context,
                      remat=remat)
    return hidden


def logits(graphdef, state, tokens, *, attention: Attention, positions=None, segment_ids=None,
           input_embeddings=None, lora: LoraWeights | None = None, token_adapters=None, lora_dropout: float = 0.0,
           dropout_key=None, remat: str = "none"):
    """Cache-free forward: tokens [batch, seq] → float32 logits [batch, seq, vocab]."""
    hidden = hidden_states(graphdef, state, tokens, attention=attention, positions=positions,
                           segment_ids=segment_ids, input_embeddings=input_embeddings, lora=lora,
                           token_adapters=token_adapters, lora_dropout=lora_dropout, dropout_key=dropout_key,
                           remat=remat)
    return nnx.merge(graphdef, state).logits(hidden)


def loss(graphdef, state, tokens, targets, weights, *, attention: Attention, positions=None, segment_ids=None,
         input_embeddings=None, lora: LoraWeights | None = None, token_adapters=None, lora_dropout: float = 0.0,
         dropout_key=None, remat: str = "none"):
    """Weighted mean next-token cross-entropy. targets/weights [batch, seq]; weight 0 = ignored.

    Differentiable w.r.t. `lora` as well as `state` (train an adapter alone: grad w.r.t. `lora`).
    """
    lg = logits(graphdef, state, tokens, attention=attention, positions=positions, segment_ids=segment_ids,
                input_embeddings=input_embeddings, lora=lora, token_adapters=token_adapters,
                lora_dropout=lora_dropout, dropout_key=dropout_key, remat=remat)
    log_probs = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    # All-zero weights give 0, not NaN.
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def extend(graphdef, state, tokens, num_new, cache: KVCache, *, attention: Attention, input_embeddings=None,
           lora: LoraWeights | None = None, token_adapters=None):
    """Append tokens [batch, chunk] (row b: its first num_new[b] are real) to the cache.

    Serves both prefill (a whole prompt or a chunk of it) and decode (chunk 1). Returns the float32
    logits at each row's last real token [batch, vocab] and the updated cache.
    `input_embeddings` [batch, chunk, hidden], if given, replaces the token embeddings.
    `token_adapters` [batch] (per row) or [batch, chunk], with `lora`: see `hidden_states`.
    """
    model = nnx.merge(graphdef, state)
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    x = model.embed_tokens(tokens) if input_embeddings is None else input_embeddings
    if lora is None:
        hidden, cache = model(x, positions=positions, attention=attention, cache=cache, num_new=num_new)
    else:
        context = padded_batch_context(lora, token_adapters, *tokens.shape)
        hidden, cache = model(x, positions=positions, attention=attention, cache=cache, num_new=num_new,
                              lora=context)
    last = jnp.take_along_axis(hidden, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def extend_packed(graphdef, state, tokens, cu_q_lens, cache: KVCache, *, attention: Attention,
                  input_embeddings=None, embedding_mask=None, lora: LoraWeights | None = None,
                  token_adapters=None):
    """Append packed tokens [T] to the cache: row b's new tokens are tokens[cu_q_lens[b]:cu_q_lens[b+1]].

    The packed form of `extend` (rows are not padded to the longest chunk, so a step can mix one
    decode token per row with long prompt chunks). cu_q_lens [rows + 1] int32 starts at 0; a row
    may take no tokens; tokens past cu_q_lens[-1] are padding (neither written nor counted).
    Row b's tokens take positions cache.lengths[b], cache.lengths[b] + 1, ...
    `input_embeddings` [T, hidden] with `embedding_mask` [T] bool: masked tokens take their
    embedding from there instead of the token table (media).
    `token_adapters` [T] int32 with `lora`: token t's adapter (-1 = base); all tokens of a row must
    share one (decode-shaped steps run `bgmv` per token, longer ones `sgmv` per row).
    Returns the float32 logits at each row's last new token [rows, vocab] (undefined for a row
    that took none) and the updated cache.
    """
    model = nnx.merge(graphdef, state)
    num_tokens = tokens.shape[0]
    slots, positions = packed_layout(cu_q_lens, cache.lengths, num_tokens)
    x = model.embed_tokens(tokens)
    if input_embeddings is not None:
        if embedding_mask is None:
            raise ValueError("input_embeddings needs its embedding_mask")
        x = jnp.where(embedding_mask[:, None], input_embeddings.astype(x.dtype), x)
    if lora is None:
        hidden, cache = model(x[None], positions=positions[None], attention=attention, cache=cache,
                              cu_q_lens=cu_q_lens, token_slots=slots)
    else:
        context = packed_context(lora, token_adapters, cu_q_lens, num_tokens)
        hidden, cache = model(x[None], positions=positions[None], attention=attention, cache=cache,
                              cu_q_lens=cu_q_lens, token_slots=slots, lora=context)
    last = jnp.clip(cu_q_lens[1:] - 1, 0, num_tokens - 1)
    return model.logits(hidden[0, last]), cache


def decode_step(graphdef, state, tokens, cache: KVCache, *, attention: Attention, lora: LoraWeights | None = None,
                token_adapters=None):
    """One token per sequence: tokens [batch] → logits [batch, vocab], updated cache."""
    return extend(graphdef, state, tokens[:, None], jnp.ones_like(cache.lengths), cache, attention=attention,
                  lora=lora, token_adapters=token_adapters)
