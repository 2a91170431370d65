"""The training forward pass: one packed batch → the masked next-token loss, for a bare LLM or NVILA.

Batches follow the training batch format (tokens, targets, weights, positions, segment_ids
[B, L]; `images` [B, M, H, W, 3] for a vision model). For NVILA, all B·M single tiles go through
the tower and projector in one batched call (`nvila.tile_tokens`), each tile's tokens are followed
by the media-end embeddings ("\\n", as `embed_prompt` splices them), and the [B, M·K, D] rows are
scattered onto the image-token positions: the j-th image-token position of row b (counting from
the start of the row) takes row j of that row's blocks, so the k-th run of K positions is image k.
A row with more than M·K image-token positions breaks the batch format (the data pipeline keeps
at most M images per row); the extra positions would repeat the last block row.
Videos (`videos` [B, V, T, H, W, 3], when the batch has them) go the same way: all B·V·T frames
through the tower and projector in one call, each video's frames pooled into its block
(`nvila.pooled_video_block`, what `video_block` gives at inference: Kv rows, end tokens included),
and the j-th video-token position of row b takes row j of that row's [V·Kv, D] video blocks.
A Dynamic-S2 batch (`images` [B, N, ...] holding every tile of the row's images, plus the tables
`s2_index`, `s2_weight`, `s2_rows`) instead merges each image's scales and orders its block tokens
through those tables (`jvila.train.dynamic_s2`): one program for any mix of tile grids.
The LLM then runs through the functional core's `loss` with those `input_embeddings` — the same
code path serving uses.

`compute_dtype` bfloat16 casts the float parameters inside (the float32 master copy is what the
optimizer sees; gradients come back in float32 through the cast) and runs every module's math in
that dtype; logits and the loss stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jvila.models import functional
from jvila.models.attention import Attention
from jvila.models.lora import LoraWeights
from jvila.models.nvila import NVILA, media_end_embeddings, pooled_video_block, tile_tokens, with_end_tokens
from jvila.train import dynamic_s2

TEXT_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def cast_floats(tree, dtype):
    """Every floating leaf of `tree` cast to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """Set `compute_dtype` on every submodule that has one (a trace-time attribute; no arrays move)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    return model


def image_embeddings(model: NVILA, images: jax.Array) -> jax.Array:
    """images [B, M, H, W, 3] → per row, every image's block with end tokens: [B, M·K, D]."""
    b, m = images.shape[:2]
    tokens = tile_tokens(model, images.reshape(b * m, *images.shape[2:]))  # [B·M, t, D]
    blocks = with_end_tokens(tokens, media_end_embeddings(model))  # [B·M·K, D]
    return blocks.reshape(b, -1, blocks.shape[-1])


def splice_images(text_embeddings: jax.Array, tokens: jax.Array, blocks: jax.Array, image_token_id: int):
    """Put block row j of row b at the j-th image-token position of row b; other positions keep their text."""
    is_image = tokens == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, blocks.shape[1] - 1)
    gathered = jnp.take_along_axis(blocks, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeddings.dtype), text_embeddings)


def video_embeddings(model: NVILA, videos: jax.Array) -> jax.Array:
    """videos [B, V, T, H, W, 3] → per row, every video's block (`video_block`'s rows): [B, V·Kv, D]."""
    b, v, t = videos.shape[:3]
    tokens = tile_tokens(model, videos.reshape(b * v * t, *videos.shape[3:]))  # [B·V·T, s, D]
    pools = tuple(tuple(p) for p in model.config.video_pool_sizes) or ((1, 1, 1),)
    end = media_end_embeddings(model)
    blocks = jax.vmap(lambda frames: pooled_video_block(frames, pools, end))(
        tokens.reshape(b * v, t, *tokens.shape[1:]))  # [B·V, Kv, D]
    return blocks.reshape(b, -1, blocks.shape[-1])


def check_videos(videos, tokens) -> None:
    if videos.ndim != 6 or videos.shape[0] != tokens.shape[0]:
        raise ValueError(f"videos must be [B={tokens.shape[0]}, V, T, H, W, 3], got shape {tuple(videos.shape)}")


def splice_videos(model: NVILA, embeddings: jax.Array, tokens: jax.Array, videos: jax.Array) -> jax.Array:
    """The row's video blocks at its video-token positions (k-th run of Kv positions = video k)."""
    check_videos(videos, tokens)
    if videos.shape[1] == 0:
        return embeddings
    # The same scatter as images': only the placeholder id differs.
    return splice_images(embeddings, tokens, video_embeddings(model, videos), model.config.video_token_id)


def batch_loss(graphdef, params, batch: dict, *, attention: Attention, remat: str = "none",
               compute_dtype=jnp.float32, lora: LoraWeights | None = None, dropout_key=None,
               lora_dropout: float = 0.0):
    """(loss, aux) of one batch: the weighted mean next-token cross-entropy, aux {"tokens": sum(weights)}.

    `graphdef, params`: the whole model split by nnx (an NVILA or a bare LLM). `lora`: stacked
    adapters (one, applied to every token) on the LLM; `dropout_key` with `lora_dropout` > 0 turns
    on LoRA dropout. Differentiable w.r.t. `params` and `lora`.
    """
    missing = [k for k in TEXT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}; a training batch has {list(TEXT_KEYS)} (+ images for NVILA)")
    params = cast_floats(params, compute_dtype)
    if lora is not None:
        lora = LoraWeights(cast_floats(lora.layers, compute_dtype), lora.scales)
    model = with_compute_dtype(nnx.merge(graphdef, params), compute_dtype)
    tokens = batch["tokens"]
    if isinstance(model, NVILA):
        if "images" not in batch:
            raise ValueError("an NVILA batch needs 'images' [B, M, H, W, 3] (zeros for rows without images)")
        images = batch["images"]
        if images.ndim != 5 or images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images must be [B={tokens.shape[0]}, M, H, W, 3], got shape {tuple(images.shape)}")
        if "videos" in batch:
            check_videos(batch["videos"], tokens)
        # Dynamic-S2 rows carry host-built tables (jvila.train.dynamic_s2); otherwise one tile per image.
        blocks = dynamic_s2.image_embeddings(model, batch) if "s2_index" in batch else image_embeddings(model, images)
        embeddings = splice_images(model.llm.embed_tokens(tokens), tokens, blocks, model.config.image_token_id)
        if "videos" in batch:
            embeddings = splice_videos(model, embeddings, tokens, batch["videos"])
        llm = model.llm
    else:
        if "images" in batch or "videos" in batch:
            raise ValueError("the batch has images or videos but the model has no vision tower")
        embeddings, llm = None, model
    llm_graphdef, llm_params = nnx.split(llm)
    weights = batch["weights"].astype(jnp.float32)
    loss = functional.loss(llm_graphdef, llm_params, tokens, batch["targets"], weights, attention=attention,
                           positions=batch["positions"], segment_ids=batch["segment_ids"],
                           input_embeddings=embeddings, lora=lora, lora_dropout=lora_dropout,
                           dropout_key=dropout_key if lora_dropout > 0 else None, remat=remat)
    return loss, {"tokens": jnp.sum(weights)}
