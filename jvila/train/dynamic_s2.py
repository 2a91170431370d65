"""Dynamic-S2 images in training: host-built tables that make any mix of tile grids one static program.

At inference (`nvila.dynamic_s2_tokens`) one image's tiles become tokens in four steps, each of which
depends on the image's last-scale grid (rows, cols): the tower maps every tile to a g x g feature
map; each scale's maps are stitched and area-resized to the output scale's map; the scales are
concatenated on channels and the map is cut into g x g blocks for the projector; the projected blocks
are stitched again and read row-major, then the "\\n" end embeddings follow. Jitting that per grid
would compile once per grid mix. But stitching, area resizing and splitting are fixed linear maps
for a given grid, so the host writes them down as tables and the step runs one program for all:

- `s2_index` int32 [B, S, N·g², J] and `s2_weight` float32 [B, S, N·g², J]: for scale s and every
  pixel of the row's N output block slots (g x g each), J (feature-pixel, weight) terms into the
  row's flat tower features [N·g², C]. The step does one weighted gather-sum per scale and
  concatenates the scales on channels (ascending, as `merge_dynamic_s2`). A single-tile image of a
  Dynamic-S2 model (a multi-image record) is one block whose every scale reads its own tile with
  weight 1: the repetition on channels `nvila._project_tiles` does.
- `s2_rows` int32 [B, N·(t + k)]: for the j-th image-token position of the row, which row of
  [the projector's tokens of all N blocks (N·t), then the k end embeddings] it takes: blocks
  re-stitched row-major over each image, then its end tokens.

`images` [B, N, S0, S0, 3] holds every tile of the row's images in order (unused slots zero) and N =
`DataConfig.max_tiles_per_row`. An image of n tiles yields at most n output blocks and n·(t + k)
token rows, so N blocks and N·(t + k) rows always suffice. The tables index within a row, so
microbatches and data-parallel shards (which split rows) keep them valid.

The area windows are `nvila._area_windows` (torch's "area" interpolation): the training merge and the
inference merge share their definition. Inference averages one axis, then the other; the gather-sum
adds the same terms with product weights, which differs from it by float32 rounding only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jvila.models.nvila import _area_windows, feature_maps, media_end_embeddings, s2_scale_grids

TABLE_KEYS = ("s2_index", "s2_weight", "s2_rows")

Grid = tuple[int, int] | None  # an image's last-scale (rows, cols); None: a single tile


@dataclasses.dataclass(frozen=True)
class S2Layout:
    """The static shapes of a Dynamic-S2 training batch and the host tables that fill them. Picklable.

    scales: the model's S2 scales (pixels, ascending); resize_index: the output scale
    (`s2_resize_output_to_scale_idx`); grid_size: g, the tower's feature-map side per tile;
    block_tokens: t, the projector's tokens per g x g block; end_tokens: k; max_tiles: N, the row's
    tile budget; terms: J, gather terms per output pixel and scale (enough for every grid tiling can
    choose).
    """

    scales: tuple[int, ...]
    resize_index: int
    grid_size: int
    block_tokens: int
    end_tokens: int
    max_tiles: int
    terms: int

    @classmethod
    def create(cls, nvila_config, max_tiles_per_row: int, max_image_tiles: int) -> S2Layout:
        """From an NVILAConfig, the row's tile budget and the tiling's `max_tiles` (the last scale's
        largest grid, `MediaSettings.max_tiles`)."""
        from jvila.models.projector import tokens_per_map
        from jvila.processing.tiling import candidate_grids

        cfg = nvila_config
        if not cfg.dynamic_s2:
            raise ValueError("Dynamic-S2 training tables need a model with dynamic_s2 features")
        scales = tuple(int(s) for s in cfg.s2_scales)
        g = cfg.vision.grid_size
        side = int(round(tokens_per_map(cfg.projector_type, g, g) ** 0.5))
        layout = cls(scales, cfg.s2_resize_output_to_scale_idx, g, tokens_per_map(cfg.projector_type, g, g),
                     len(cfg.media_end_token_ids), int(max_tiles_per_row), 1)
        if side * side != layout.block_tokens:
            raise ValueError(f"projected blocks of {layout.block_tokens} tokens are not square maps")
        min_grid = (scales[-1] // scales[0]) ** 2
        if max_image_tiles < min_grid:
            raise ValueError(f"max_tiles={max_image_tiles} is below the {min_grid} tiles the last S2 scale needs")
        terms = max(layout._terms((rows, cols))
                    for cols, rows in candidate_grids(min_grid, max_image_tiles))
        layout = dataclasses.replace(layout, terms=terms)
        if layout.max_tiles < layout.image_tiles((1, min_grid)):
            raise ValueError(f"max_tiles_per_row={layout.max_tiles} is below the {layout.image_tiles((1, min_grid))} "
                             "tiles of the smallest Dynamic-S2 image")
        return layout

    # ------------------------------------------------------------------ per image
    def image_tiles(self, grid: Grid) -> int:
        """Tiles of one image: every scale's grid for Dynamic-S2, one for a single tile."""
        return 1 if grid is None else sum(r * c for r, c in s2_scale_grids(self.scales, grid))

    def output_grid(self, grid: Grid) -> tuple[int, int]:
        """The (rows, cols) of g x g blocks the projector sees for one image."""
        return (1, 1) if grid is None else tuple(s2_scale_grids(self.scales, grid)[self.resize_index])

    def image_rows(self, grid: Grid) -> int:
        """Embedding rows of one image's block, end tokens included (= `nvila.image_token_count`)."""
        rows, cols = self.output_grid(grid)
        return rows * cols * self.block_tokens + self.end_tokens

    @property
    def token_rows(self) -> int:
        """Q: the image-token rows a row's tables address (N·(t + k))."""
        return self.max_tiles * (self.block_tokens + self.end_tokens)

    def _terms(self, grid: tuple[int, int]) -> int:
        g, out = self.grid_size, self.output_grid(grid)
        widths = 1
        for rows, cols in s2_scale_grids(self.scales, grid):
            wy = _area_windows(rows * g, out[0] * g)[0].shape[1]
            wx = _area_windows(cols * g, out[1] * g)[0].shape[1]
            widths = max(widths, wy * wx)
        return widths

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a frozen, hashable layout; a few grids each)
    def _image_terms(self, grid: Grid):
        """Per scale: (index [Ho·Wo, J], weight [Ho·Wo, J]) over the image's output pixels in block
        order (block-major, row-major within a block), feature indices counted from the image's first
        tile (a row adds its offset). Cached: a grid's tables are the same in every row."""
        g, gg = self.grid_size, self.grid_size ** 2
        if grid is None:
            index = np.zeros((gg, self.terms), np.int64)
            weight = np.zeros((gg, self.terms), np.float32)
            index[:, 0] = np.arange(gg)
            weight[:, 0] = 1.0
            return [(index, weight)] * len(self.scales)
        if self._terms(grid) > self.terms:
            raise ValueError(f"a {grid[0]}x{grid[1]} Dynamic-S2 grid needs {self._terms(grid)} gather terms; the "
                             f"layout was built for {self.terms} (max_tiles of the tiling)")
        out_rows, out_cols = self.output_grid(grid)
        height, width = out_rows * g, out_cols * g
        # Output pixel p (block-major) sits at map position (y, x).
        block, inner = np.divmod(np.arange(height * width), gg)
        y = (block // out_cols) * g + inner // g
        x = (block % out_cols) * g + inner % g
        per_scale, first = [], 0
        for rows, cols in s2_scale_grids(self.scales, grid):
            iy, my = _area_windows(rows * g, height)
            ix, mx = _area_windows(cols * g, width)
            wy = my[y] / my[y].sum(-1, keepdims=True)  # [P, wy]
            wx = mx[x] / mx[x].sum(-1, keepdims=True)  # [P, wx]
            sy, sx = iy[y], ix[x]  # source map rows / cols
            sy, sx = sy[:, :, None], sx[:, None, :]
            # Source map position -> its tile (row-major in this scale) and the pixel inside it.
            tile = first + (sy // g) * cols + sx // g
            index = (tile * gg + (sy % g) * g + sx % g).reshape(len(y), -1)
            weight = (wy[:, :, None] * wx[:, None, :]).reshape(len(y), -1).astype(np.float32)
            pad = self.terms - index.shape[1]
            per_scale.append((np.pad(index, ((0, 0), (0, pad))), np.pad(weight, ((0, 0), (0, pad)))))
            first += rows * cols
        return per_scale

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def _image_token_order(self, grid: Grid) -> np.ndarray:
        """Token rows of one image's blocks in prompt order: row-major over the re-stitched block maps."""
        out_rows, out_cols = self.output_grid(grid)
        t = self.block_tokens
        side = int(round(t ** 0.5))
        yy, xx = np.divmod(np.arange(out_rows * side * out_cols * side), out_cols * side)
        return ((yy // side) * out_cols + xx // side) * t + (yy % side) * side + xx % side

    # ------------------------------------------------------------------ per row / batch
    def row_tables(self, grids: Sequence[Grid]) -> dict[str, np.ndarray]:
        """The tables of one row whose images, in order, have these grids (None = single tile)."""
        gg, scales = self.grid_size ** 2, len(self.scales)
        index = np.zeros((scales, self.max_tiles * gg, self.terms), np.int32)
        weight = np.zeros((scales, self.max_tiles * gg, self.terms), np.float32)
        rows = np.zeros(self.token_rows, np.int32)
        tiles = blocks = used = 0
        pool_end = self.max_tiles * self.block_tokens  # the end embeddings follow every block token
        for grid in grids:
            count = self.image_tiles(grid)
            out_rows, out_cols = self.output_grid(grid)
            if tiles + count > self.max_tiles:
                raise ValueError(f"the row's images need more than max_tiles_per_row={self.max_tiles} tiles")
            start = blocks * gg
            for s, (idx, w) in enumerate(self._image_terms(grid)):
                index[s, start:start + len(idx)] = idx + tiles * gg
                weight[s, start:start + len(idx)] = w
            order = blocks * self.block_tokens + self._image_token_order(grid)
            ends = pool_end + np.arange(self.end_tokens)
            rows[used:used + len(order) + self.end_tokens] = np.concatenate([order, ends])
            used += len(order) + self.end_tokens
            tiles += count
            blocks += out_rows * out_cols
        return {"s2_index": index, "s2_weight": weight, "s2_rows": rows}

    def batch_tables(self, rows: Sequence[Sequence[Grid]]) -> dict[str, np.ndarray]:
        """Row tables stacked: {"s2_index", "s2_weight", "s2_rows"} with a leading [B]."""
        tables = [self.row_tables(grids) for grids in rows]
        return {k: np.stack([t[k] for t in tables]) for k in TABLE_KEYS}


# ----------------------------------------------------------------------------------------------
# The step's side (traced under jit)
# ----------------------------------------------------------------------------------------------

def merge_features(maps: jax.Array, s2_index: jax.Array, s2_weight: jax.Array) -> jax.Array:
    """Tower maps [B, N, g, g, C] → projector inputs [B·N, g, g, C·S] (scales on channels, ascending).

    Each scale is one weighted gather-sum over the row's flat features, in float32 (as
    `nvila.area_resize`), cast back to the maps' dtype for the projector.
    """
    b, n, g, _, c = maps.shape
    flat = maps.reshape(b, n * g * g, c).astype(jnp.float32)
    take = jax.vmap(lambda f, i: f[i])  # per row: [P, C][idx [P]] -> [P, C]
    scales = []
    for s in range(s2_index.shape[1]):
        acc = None
        for j in range(s2_index.shape[3]):
            term = s2_weight[:, s, :, j, None] * take(flat, s2_index[:, s, :, j])
            acc = term if acc is None else acc + term
        scales.append(acc)
    merged = jnp.concatenate(scales, axis=-1).astype(maps.dtype)
    return merged.reshape(b * n, g, g, -1)


def order_tokens(block_tokens: jax.Array, end: jax.Array, s2_rows: jax.Array) -> jax.Array:
    """Projected blocks [B, N, t, D] + end embeddings [k, D] → the row's image-token rows [B, Q, D]."""
    b, n, t, d = block_tokens.shape
    pool = jnp.concatenate([block_tokens.reshape(b, n * t, d),
                            jnp.broadcast_to(end.astype(block_tokens.dtype), (b, *end.shape))], axis=1)
    return jax.vmap(lambda p, i: p[i])(pool, s2_rows)


def image_embeddings(model, batch: dict) -> jax.Array:
    """A Dynamic-S2 batch's `images` [B, N, S0, S0, 3] and tables → the rows' image-token rows [B, Q, D],
    in prompt order (what `forward.splice_images` puts at the image-token positions)."""
    missing = [k for k in TABLE_KEYS if k not in batch]
    if missing:
        raise ValueError(f"a Dynamic-S2 batch needs all of {list(TABLE_KEYS)}; missing {missing}")
    images, index, weight, rows = batch["images"], *(batch[k] for k in TABLE_KEYS)
    cfg = model.config
    if not cfg.dynamic_s2:
        raise ValueError("the batch has Dynamic-S2 tables but the model has no dynamic_s2 features")
    b, n, g = images.shape[0], images.shape[1], cfg.vision.grid_size
    want = (b, len(cfg.s2_scales), n * g * g)
    if index.ndim != 4 or tuple(index.shape[:3]) != want or tuple(weight.shape) != tuple(index.shape):
        raise ValueError(f"s2_index and s2_weight must both be [B, scales, N·g², terms] = {want + ('J',)}, got "
                         f"{tuple(index.shape)} and {tuple(weight.shape)}")
    if rows.ndim != 2 or rows.shape[0] != b:
        raise ValueError(f"s2_rows must be [B={b}, N·(t + k)], got {tuple(rows.shape)}")
    maps = feature_maps(model, images.reshape(b * n, *images.shape[2:]))  # [B·N, g, g, C]
    merged = merge_features(maps.reshape(b, n, g, g, -1), index, weight)
    tokens = model.projector(merged)  # [B·N, t, D]
    return order_tokens(tokens.reshape(b, n, *tokens.shape[1:]), media_end_embeddings(model), rows)
