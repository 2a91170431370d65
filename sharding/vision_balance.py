"""LongVILA's balanced vision stage for sequence-parallel training on long videos.

Stage 1: a video's frames are split evenly over the sequence ranks, each encoding only its own
(LongVILA spreads the remainder one frame each; with one program for every rank that is the same
as padding to ceil(F / ranks) frames per rank, the padding frames dropped afterwards). The tower
runs under `jax.shard_map` with its weights replicated, so no rank encodes another's frames.
Stage 2: the frame tokens are spliced into the text sequence and the whole sequence is re-sharded
evenly over the sequence axes for the LLM, whatever share of it is video (a sharding constraint:
XLA moves each token once to its owner).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding.hybrid_attention import sequence_axes


def frames_per_rank(num_frames: int, ranks: int) -> list[int]:
    """LongVILA's split: num_frames // ranks each, the first num_frames % ranks ranks one more."""
    if num_frames < 1 or ranks < 1:
        raise ValueError(f"need at least one frame and one rank, got {num_frames} frames over {ranks} ranks")
    base, extra = divmod(num_frames, ranks)
    return [base + (r < extra) for r in range(ranks)]


def _sequence_spec(mesh):
    axes = sequence_axes(mesh)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def encode_frames_balanced(graphdef, state, frames, *, mesh, select_layer: int = -2):
    """frames [F, H, W, 3] → tower features [F, tokens, hidden], each sequence rank encoding its share.

    `graphdef, state` are a `SiglipVisionTower` split. The result stays sharded by frame over the
    mesh's sequence axes.
    """
    seq = _sequence_spec(mesh)
    ranks = int(np.prod([mesh.shape[a] for a in ((seq,) if isinstance(seq, str) else seq or ())]))
    num_frames = frames.shape[0]
    per_rank = max(frames_per_rank(num_frames, ranks))
    padded = jnp.concatenate([frames, jnp.zeros((per_rank * ranks - num_frames, *frames.shape[1:]), frames.dtype)])

    def encode(state, local_frames):
        return nnx.merge(graphdef, state)(local_frames, select_layer=select_layer)

    replicated = jax.tree.map(lambda _: PartitionSpec(), state)
    features = jax.shard_map(encode, mesh=mesh, in_specs=(replicated, PartitionSpec(seq)),
                             out_specs=PartitionSpec(seq), check_vma=False)(state, padded)
    return features[:num_frames]


def splice_and_reshard(text_embeddings, media_tokens, media_mask, *, mesh, rows=None):
    """The LLM's input [batch, seq, hidden]: text embeddings with media tokens at `media_mask`'s
    positions, in order, re-sharded evenly over the sequence axes.

    media_tokens [M, hidden] are every masked position's embedding, row-major; media_mask
    [batch, seq] bool must mark exactly M positions.
    """
    batch, length, hidden = text_embeddings.shape
    if media_tokens.shape[-1] != hidden:
        raise ValueError(f"media tokens of width {media_tokens.shape[-1]} for an LLM of width {hidden}")
    ways = int(np.prod([mesh.shape[a] for a in sequence_axes(mesh)] or [1]))
    if length % ways:
        raise ValueError(f"sequence length {length} does not split over {ways} sequence shards: pad it to a "
                         f"multiple of {ways}")
    flat_mask = media_mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, media_tokens.shape[0] - 1)
    spliced = jnp.where(flat_mask[:, None], media_tokens[index].astype(text_embeddings.dtype),
                        text_embeddings.reshape(-1, hidden)).reshape(batch, length, hidden)
    sharding = NamedSharding(mesh, PartitionSpec(rows, _sequence_spec(mesh), None))
    return jax.lax.with_sharding_constraint(spliced, sharding)
