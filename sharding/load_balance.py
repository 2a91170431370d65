"""Zigzag load balancing for causal ring attention, applied once to a batch.

With contiguous shards, ring device r has r+1 visible key blocks of n under a causal mask, so the
last device works n times as long as the first. Cut the sequence into 2n chunks and give device r
chunks r and 2n-1-r: every device then has the same visible work (Brandon et al.; LightSeq and
LongVILA use this order). Only the order of tokens changes: positions (RoPE), segment ids, targets
and loss weights are permuted with them, so the model, the loss and its gradients are unchanged;
attention is told the layout ("zigzag") so its causal mask uses the true positions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def zigzag_order(seq_len: int, ring_size: int, *, shard_multiple: int = 1) -> np.ndarray:
    """order[i] = the original index of the token at zigzag slot i (a permutation of seq_len).

    `shard_multiple`: each of the 2·ring_size chunks must also split evenly this many ways
    (the a2a axis of a 2D mesh).
    """
    pieces = 2 * ring_size * shard_multiple
    if seq_len % pieces:
        raise ValueError(f"a zigzag layout over a {ring_size}-device ring (x{shard_multiple} a2a) needs a sequence "
                         f"length divisible by {pieces}; got {seq_len}: pad the batch to a multiple of {pieces}")
    chunk = seq_len // (2 * ring_size)
    chunks = []
    for r in range(ring_size):
        chunks += [r, 2 * ring_size - 1 - r]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def to_zigzag(x, ring_size: int, *, axis: int = 1, shard_multiple: int = 1):
    """x reordered along `axis` (the sequence) into the zigzag layout."""
    return jnp.take(x, zigzag_order(x.shape[axis], ring_size, shard_multiple=shard_multiple), axis=axis)


def from_zigzag(x, ring_size: int, *, axis: int = 1, shard_multiple: int = 1):
    """The inverse of `to_zigzag`."""
    order = zigzag_order(x.shape[axis], ring_size, shard_multiple=shard_multiple)
    return jnp.take(x, np.argsort(order), axis=axis)


def zigzag_batch(batch: dict, ring_size: int, *, shard_multiple: int = 1) -> dict:
    """Every [batch, seq, ...] entry of a training batch put in zigzag order.

    `positions` is added (0..seq-1 per row) when missing, since after the permutation a token's
    position is no longer its index. Entries are e.g. tokens, targets, weights, segment_ids.
    """
    if "tokens" not in batch:
        raise ValueError("a batch to balance needs its 'tokens' [batch, seq]")
    tokens = batch["tokens"]
    batch = dict(batch)
    if batch.get("positions") is None:
        batch["positions"] = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return {name: None if value is None else to_zigzag(value, ring_size, shard_multiple=shard_multiple)
            for name, value in batch.items()}
