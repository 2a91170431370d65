"""NVILA: a SigLIP tower and a projector in front of the decoder; media become embedding blocks.

The LLM never sees pixels. Each media item (its tiles or frames already processed) becomes one
block of LLM-width embeddings ending with the embeddings of the "\\n" token id(s), and
`embed_prompt` splices the blocks in at the prompt's placeholder tokens, as VILA's `_embed` does.

- Dynamic-S2 image (NVILA): tiles arrive scales ascending, row-major within a scale; the last
  scale's grid (rows, cols) is given. Each scale's tiles are stitched into one feature map, every
  map is area-resized to the output scale's map and the maps are concatenated on channels; the
  result is cut back into tile-sized blocks, projected per block, re-stitched and flattened row-major
  (VILA's `merge_features_for_dynamic_s2` and `encode_images`).
- Single tile (multi-image prompts, "resize", NVILA-Lite's tiles): one block per tile. A model with
  Dynamic-S2 features repeats a single tile's features once per scale on channels.
- Video: per-frame tokens, then TSP pooling (means over frames x rows x cols windows of the
  projected tokens) with one end token per group (VILA's `TSPVideoEncoder`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.models.llm import LLM
from jvila.models.projector import Projector, tokens_per_map
from jvila.models.siglip import SiglipVisionTower
from jvila.vision_config import NVILAConfig


class NVILA(nnx.Module):
    """Children: `llm` (the decoder, driven by the functional core), `vision_tower`, `projector`."""

    def __init__(self, cfg: NVILAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32):
        self.config = cfg
        self.llm = LLM(cfg.llm, rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.vision_tower = SiglipVisionTower(cfg.vision, rngs=rngs, param_dtype=param_dtype,
                                              compute_dtype=compute_dtype)
        self.projector = Projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm.hidden_size, rngs=rngs,
                                   param_dtype=param_dtype, compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------------------------
# Pure array functions (static shapes; traceable under jit)
# ----------------------------------------------------------------------------------------------

def area_resize(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """[h, w, c] → [out_h, out_w, c] as torch's `F.interpolate(mode="area")` (adaptive average pooling).

    Output index i averages input indices [⌊i·in/out⌋, ⌈(i+1)·in/out⌉): windows of 1 or 2 inputs when
    the map grows by 3/2 (896→1344), plain repetition when it grows by a whole factor (448→1344).
    Computed in float32, one axis at a time (each window's sum divided by its length).
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    for axis, size_out in ((0, out_h), (1, out_w)):
        index, mask = _area_windows(x.shape[axis], size_out)
        gathered = jnp.take(x, jnp.asarray(index), axis=axis)  # window slots follow the axis
        mask = jnp.asarray(mask)
        shape = [1] * (x.ndim + 1)
        shape[axis], shape[axis + 1] = mask.shape
        summed = jnp.sum(gathered * mask.reshape(shape), axis=axis + 1)
        count = mask.sum(-1).reshape([size_out if a == axis else 1 for a in range(x.ndim)])
        x = summed / count
    return x.astype(dtype)


def _area_windows(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the input indices of its window, padded to one width, and a 0/1 mask."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [-(-(i + 1) * size_in // size_out) for i in range(size_out)]
    width = max(e - s for s, e in zip(starts, ends))
    index = np.array([[min(s + k, e - 1) for k in range(width)] for s, e in zip(starts, ends)], np.int32)
    mask = np.array([[1.0 if s + k < e else 0.0 for k in range(width)] for s, e in zip(starts, ends)], np.float32)
    return index, mask


def stitch_tiles(tiles: jax.Array, rows: int, cols: int) -> jax.Array:
    """[rows·cols, h, w, c] in row-major tile order → one [rows·h, cols·w, c] map."""
    n, h, w, c = tiles.shape
    return tiles.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def split_tiles(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """One [H, W, c] map → [rows·cols, H/rows, W/cols, c] tiles, row-major (inverse of `stitch_tiles`)."""
    big_h, big_w, c = x.shape
    h, w = big_h // rows, big_w // cols
    return x.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)


def s2_scale_grids(scales: Sequence[int], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(rows, cols) of tiles at each scale: square grids below the last scale, `grid` at the last."""
    return [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [tuple(grid)]


def merge_dynamic_s2(features: jax.Array, scales: Sequence[int], grid: tuple[int, int],
                     resize_index: int = -1) -> tuple[jax.Array, tuple[int, int]]:
    """Tile feature maps [tiles, g, g, C] (scales ascending, row-major) → one [H, W, C·scales] map.

    Every scale's stitched map is area-resized to the map of scale `resize_index` (the last, for
    NVILA) and the scales are concatenated on channels in ascending order. Also returns the tile
    grid of the output scale, into which the map is cut again for the projector.
    """
    grids = s2_scale_grids(scales, grid)
    expected = sum(r * c for r, c in grids)
    if features.shape[0] != expected:
        raise ValueError(f"Dynamic-S2 with scales {tuple(scales)} and a {grid[0]}x{grid[1]} last-scale grid needs "
                         f"{expected} tiles, got {features.shape[0]}")
    maps, start = [], 0
    for rows, cols in grids:
        maps.append(stitch_tiles(features[start:start + rows * cols], rows, cols))
        start += rows * cols
    out_h, out_w = maps[resize_index].shape[:2]
    merged = jnp.concatenate([area_resize(m, out_h, out_w) for m in maps], axis=-1)
    return merged, grids[resize_index]


def stitch_block_tokens(tokens: jax.Array, rows: int, cols: int) -> jax.Array:
    """Projected blocks [rows·cols, t, D] (t a square) → [rows·cols·t, D], row-major over the whole image.

    The blocks' token maps are put back side by side first, so a row of tokens runs across blocks.
    """
    n, t, d = tokens.shape
    side = int(round(t ** 0.5))
    if side * side != t:
        raise ValueError(f"projected blocks of {t} tokens are not square maps")
    return stitch_tiles(tokens.reshape(n, side, side, d), rows, cols).reshape(-1, d)


def temporal_pool(tokens: jax.Array, pool: tuple[int, int, int]) -> jax.Array:
    """Per-frame tokens [frames, s, D] (s a square map) → [groups, s', D]: means over (frames, rows, cols) windows."""
    frames, s, d = tokens.shape
    side = int(round(s ** 0.5))
    pt, ph, pw = pool
    if frames < pt:
        raise ValueError(f"a video of {frames} frames is shorter than the temporal pool size {pt}")
    if frames % pt or side % ph or side % pw:
        raise ValueError(f"video features of {frames} frames x {side}x{side} tokens do not divide into pools of "
                         f"{pt}x{ph}x{pw}")
    x = tokens.reshape(frames // pt, pt, side // ph, ph, side // pw, pw, d)
    return x.mean(axis=(1, 3, 5)).reshape(frames // pt, -1, d)


def with_end_tokens(groups: jax.Array, end: jax.Array) -> jax.Array:
    """[groups, s, D] + end embeddings [k, D] → [groups·(s + k), D], each group followed by the end tokens."""
    end = jnp.broadcast_to(end.astype(groups.dtype), (groups.shape[0], *end.shape))
    return jnp.concatenate([groups, end], axis=1).reshape(-1, groups.shape[-1])


# ----------------------------------------------------------------------------------------------
# Jitted model pieces (one compile per input shape)
# ----------------------------------------------------------------------------------------------

@nnx.jit(static_argnames=("select_layer",))
def _feature_maps(tower: SiglipVisionTower, pixels, select_layer: int):
    feats = tower(pixels, select_layer=select_layer)
    n, t, c = feats.shape
    rows, cols = pixels.shape[1] // tower.config.patch_size, pixels.shape[2] // tower.config.patch_size
    return feats.reshape(n, rows, cols, c)


@nnx.jit(static_argnames=("repeat",))
def _project_tiles(projector: Projector, maps, repeat: int):
    # A single tile under a Dynamic-S2 model stands in for every scale: its features repeat on channels.
    return projector(jnp.tile(maps, (1, 1, 1, repeat)))


@nnx.jit(static_argnames=("scales", "grid", "resize_index"))
def _project_dynamic_s2(projector: Projector, features, scales, grid, resize_index):
    merged, (rows, cols) = merge_dynamic_s2(features, scales, grid, resize_index)
    blocks = projector(split_tiles(merged, rows, cols).astype(features.dtype))
    return stitch_block_tokens(blocks, rows, cols)


def feature_maps(model: NVILA, pixels) -> jax.Array:
    """Tiles or frames [n, H, W, 3] (normalized NHWC) → tower feature maps [n, H/p, W/p, width]."""
    pixels = jnp.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] == 0:
        raise ValueError(f"tiles must be a non-empty NHWC array [n, H, W, 3], got shape {tuple(pixels.shape)}")
    size = model.config.vision.image_size
    if pixels.shape[1:3] != (size, size):
        raise ValueError(f"tiles must be {size}x{size} (the tower's image size), got "
                         f"{pixels.shape[1]}x{pixels.shape[2]}")
    return _feature_maps(model.vision_tower, pixels, model.config.select_layer)


def media_end_embeddings(model: NVILA) -> jax.Array:
    """The LLM's embeddings of the media end token ids ("\\n"), [k, D]; k = 0 when none are configured."""
    ids = jnp.asarray(model.config.media_end_token_ids, jnp.int32).reshape(-1)
    # A one-hot product, not a table lookup: under jit, with the table split over its vocab rows (a
    # tensor-parallel train step), XLA's partitioned scatter-add for this constant-index lookup's
    # gradient also added it to the first row of another shard. A product's gradient has no scatter.
    table = model.llm.embed[...]
    one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=table.dtype)
    # HIGHEST: exact rows, also where matmuls default to TF32 (GPUs).
    return jnp.matmul(one_hot, table, precision=jax.lax.Precision.HIGHEST).astype(model.llm.compute_dtype)


def tile_tokens(model: NVILA, tiles) -> jax.Array:
    """Single tiles [n, S, S, 3] → projected tokens [n, t, D] (no end tokens)."""
    cfg = model.config
    repeat = len(cfg.s2_scales) if cfg.dynamic_s2 else 1
    return _project_tiles(model.projector, feature_maps(model, tiles), repeat)


def dynamic_s2_tokens(model: NVILA, tiles, grid: tuple[int, int]) -> jax.Array:
    """All Dynamic-S2 tiles of one image → its tokens [rows·cols·t, D] (no end tokens)."""
    cfg = model.config
    if not cfg.dynamic_s2:
        raise ValueError("this model has no Dynamic-S2 features; give the image as single tiles")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"the Dynamic-S2 grid must be (rows, cols) of positive ints, got {grid}")
    features = feature_maps(model, tiles)
    expected = sum(r * c for r, c in s2_scale_grids(cfg.s2_scales, grid))
    if features.shape[0] != expected:
        raise ValueError(f"Dynamic-S2 with scales {cfg.s2_scales} and a {grid[0]}x{grid[1]} last-scale grid needs "
                         f"{expected} tiles, got {features.shape[0]}")
    return _project_dynamic_s2(model.projector, features, tuple(cfg.s2_scales), grid,
                               cfg.s2_resize_output_to_scale_idx)


def image_blocks(model: NVILA, tiles, grid: tuple[int, int] | None = None) -> list[jax.Array]:
    """One image's tiles → its embedding blocks, one per `<image>` placeholder it fills.

    With `grid` (Dynamic-S2): one block [rows·cols·t + k, D]. Without: one block [t + k, D] per tile
    (a resized image is one tile; NVILA-Lite's dynamic tiles are one placeholder each).
    """
    end = media_end_embeddings(model)
    if grid is not None:
        return [with_end_tokens(dynamic_s2_tokens(model, tiles, grid)[None], end)]
    return [with_end_tokens(t[None], end) for t in tile_tokens(model, tiles)]


def video_block(model: NVILA, frames) -> jax.Array:
    """Video frames [T, S, S, 3] → one block: per pool size, groups x (pooled tokens + end tokens)."""
    frames = jnp.asarray(frames)
    pools = model.config.video_pool_sizes or ((1, 1, 1),)  # no pooling: every frame its own group
    if frames.ndim == 4 and frames.shape[0] < max(p[0] for p in pools):
        raise ValueError(f"a video of {frames.shape[0]} frames is shorter than the temporal pool size "
                         f"{max(p[0] for p in pools)}")
    return pooled_video_block(tile_tokens(model, frames), pools, media_end_embeddings(model))


def pooled_video_block(tokens: jax.Array, pools, end: jax.Array) -> jax.Array:
    """One video's per-frame tokens [T, s, D] → its block: per pool size, groups x (pooled tokens + end tokens)."""
    return jnp.concatenate([with_end_tokens(temporal_pool(tokens, tuple(p)), end) for p in pools], axis=0)


def embed_prompt(model: NVILA, token_ids, media_blocks: Sequence[jax.Array]):
    """Splice media blocks into a prompt at its placeholder tokens.

    token_ids: [L] ids with one image/video placeholder id per block, in the blocks' order.
    Returns (expanded_ids [L'] int32 numpy, input_embeddings [L', D], embedding_mask [L'] bool numpy):
    each placeholder is replaced by its whole block; at block rows the id is the placeholder's and
    the mask is True (the embedding there is not the id's own).
    """
    cfg = model.config
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.llm.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.llm.vocab_size}), got [{ids.min()}, {ids.max()}]")
    placeholders = np.flatnonzero(np.isin(ids, [cfg.image_token_id, cfg.video_token_id]))
    if len(placeholders) != len(media_blocks):
        raise ValueError(f"the prompt has {len(placeholders)} media placeholder tokens but {len(media_blocks)} "
                         "media blocks were given")
    hidden = cfg.llm.hidden_size
    for i, block in enumerate(media_blocks):
        if block.ndim != 2 or block.shape[1] != hidden or block.shape[0] == 0:
            raise ValueError(f"media block {i} must be [tokens, {hidden}], got shape {tuple(block.shape)}")
    text = model.llm.embed_tokens(jnp.asarray(ids, jnp.int32))
    id_parts, embed_parts, mask_parts = [], [], []
    start = 0
    for pos, block in zip(placeholders, media_blocks):
        id_parts += [ids[start:pos], np.full(block.shape[0], ids[pos])]
        embed_parts += [text[start:pos], block.astype(text.dtype)]
        mask_parts += [np.zeros(pos - start, bool), np.ones(block.shape[0], bool)]
        start = pos + 1
    id_parts.append(ids[start:])
    embed_parts.append(text[start:])
    mask_parts.append(np.zeros(len(ids) - start, bool))
    return (np.concatenate(id_parts).astype(np.int32), jnp.concatenate(embed_parts, axis=0),
            np.concatenate(mask_parts))


def image_token_count(cfg: NVILAConfig, grid: tuple[int, int] | None = None) -> int:
    """Embedding rows of one image block (end tokens included): Dynamic-S2 with `grid`, else one tile."""
    g = cfg.vision.grid_size
    per_tile = tokens_per_map(cfg.projector_type, g, g)
    if grid is None:
        return per_tile + len(cfg.media_end_token_ids)
    rows, cols = s2_scale_grids(cfg.s2_scales, grid)[cfg.s2_resize_output_to_scale_idx]
    return rows * cols * per_tile + len(cfg.media_end_token_ids)


def video_token_count(cfg: NVILAConfig, num_frames: int) -> int:
    """Embedding rows of one video block of `num_frames` frames (what `video_block` returns): per pool
    size, (frames / pool frames) groups of pooled tokens, each group followed by the end tokens."""
    num_frames = int(num_frames)
    pools = cfg.video_pool_sizes or ((1, 1, 1),)
    g = cfg.vision.grid_size
    side = int(round(tokens_per_map(cfg.projector_type, g, g) ** 0.5))
    rows = 0
    for pt, ph, pw in pools:
        if num_frames < 1 or num_frames % pt or side % ph or side % pw:
            raise ValueError(f"{num_frames} video frames of {side}x{side} tokens do not divide into the video pool "
                             f"{pt}x{ph}x{pw}; choose num_video_frames a multiple of {pt}")
        rows += (num_frames // pt) * ((side // ph) * (side // pw) + len(cfg.media_end_token_ids))
    return rows


# ----------------------------------------------------------------------------------------------
# Building from flat params
# ----------------------------------------------------------------------------------------------

def abstract_nvila(cfg: NVILAConfig, *, param_dtype=jnp.float32, compute_dtype=jnp.float32) -> NVILA:
    """The model's structure with shape-only parameters (no memory, no random init)."""
    return nnx.eval_shape(lambda: NVILA(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, compute_dtype=compute_dtype))


def load_params(module: nnx.Module, params: dict, *, prefix: str = "", dtype=None) -> nnx.Module:
    """Set every parameter of `module` from flat params named `prefix + path`; names and shapes must match
    exactly (extra or missing names are errors). Values are cast to `dtype` if given, else to the param's."""
    from jvila.models.params import check_params, flat_params

    state = nnx.state(module, nnx.Param)
    expected = {prefix + k: v for k, v in flat_params(state).items()}
    check_params(expected, params)
    for path, var in nnx.to_flat_state(state):
        name = prefix + ".".join(str(k) for k in path)
        var.set_value(jnp.asarray(params[name], dtype=dtype or expected[name].dtype))
    nnx.update(module, state)
    return module


def nvila_from_params(cfg: NVILAConfig, params: dict, *, param_dtype=jnp.float32,
                      compute_dtype=jnp.float32) -> NVILA:
    """An NVILA model around flat params (`llm.*`, `vision_tower.*`, `projector.*`), checked by name and shape."""
    model = abstract_nvila(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype)
    return load_params(model, params, dtype=param_dtype)
