"""Cut an image into square tiles the way NVILA does: Dynamic-S2 and InternVL-style dynamic tiling.

Matched against NVlabs/VILA llava/mm_utils.py (`dynamic_s2_preprocess`, `dynamic_preprocess`,
`find_closest_aspect_ratio`):

- A grid is (cols, rows). Candidate grids are every (cols, rows) with min_tiles <= cols*rows <=
  max_tiles, visited in ascending order of cols*rows. VILA builds the candidates as a Python set and
  sorts by the product alone, so grids with equal products keep the set's iteration order; we build
  the same set the same way, so even that order is the reference's (on CPython, where small-int
  tuple hashes do not depend on the hash seed).
- The chosen grid is the one whose cols/rows is closest to the image's width/height. On an exact tie
  a later candidate replaces the best one only if the image's area exceeds half the candidate
  grid's pixel area (0.5 * tile_size**2 * cols * rows): large images prefer more tiles.
- Resizing is PIL's `Image.resize(size)` with no filter named, as in VILA (PIL's default: bicubic
  for RGB), then tiles are cropped row-major (left to right, then top to bottom).
- Dynamic-S2: every scale but the last is a square of (scale // scales[0]) tiles per side; the last
  keeps the aspect ratio with a grid of at least (scales[-1] // scales[0])**2 tiles. Tiles come
  scale by scale, ascending; the grid returned is the last scale's (rows, cols).
- Dynamic: the grid's tiles, then (when there is more than one tile) a thumbnail of the whole image.

One deliberate difference: when no candidate grid exists (max_tiles below the minimum), VILA
silently falls back to a 1x1 grid; here that configuration is a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image

from jvila.processing.errors import MediaError

def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_tiles <= cols*rows <= max_tiles, in the reference's visiting order."""
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    # Built as a set with the reference's nesting (n, then cols, then rows) so that equal-product
    # grids keep the same relative order after the stable sort.
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(
    width: int, height: int, candidates: Sequence[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height (ties: see module doc)."""
    if not candidates:
        raise ValueError("no candidate grids to choose from")
    aspect_ratio = width / height
    area = width * height
    best, best_diff = None, float("inf")
    for cols, rows in candidates:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def crop_grid(image: PIL.Image.Image, cols: int, rows: int, tile_size: int) -> list[PIL.Image.Image]:
    """Resize to (cols*tile, rows*tile) and cut row-major into tile_size squares."""
    # No filter named: PIL's default, exactly as the reference calls it.
    resized = image.resize((cols * tile_size, rows * tile_size))
    return [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]


def dynamic_s2_tiles(
    image: PIL.Image.Image, scales: Sequence[int] = (448, 896, 1344), max_tiles: int = 12, tile_size: int = 448
) -> tuple[list[PIL.Image.Image], tuple[int, int]]:
    """Dynamic-S2 tiles (scales ascending, row-major within a scale) and the last scale's (rows, cols)."""
    scales = _check_scales(scales)
    _check_image(image)
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    tiles = []
    for scale in scales[:-1]:
        side = scale // scales[0]
        tiles += crop_grid(image, side, side, tile_size)
    min_tiles = (scales[-1] // scales[0]) ** 2
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles={max_tiles} is below the {min_tiles} tiles the last scale {scales[-1]} needs")
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_tiles, max_tiles), tile_size)
    tiles += crop_grid(image, cols, rows, tile_size)
    return tiles, (rows, cols)


def dynamic_tiles(
    image: PIL.Image.Image,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tile_size: int = 448,
    use_thumbnail: bool = True,
) -> list[PIL.Image.Image]:
    """InternVL-style tiles (row-major), then a whole-image thumbnail when there is more than one tile."""
    _check_image(image)
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    cols, rows = closest_grid(image.width, image.height, candidate_grids(min_tiles, max_tiles), tile_size)
    tiles = crop_grid(image, cols, rows, tile_size)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile_size, tile_size)))
    return tiles


def s2_tile_count(scales: Sequence[int], grid: tuple[int, int]) -> int:
    """How many tiles `dynamic_s2_tiles` makes for a last-scale grid (rows, cols)."""
    scales = _check_scales(scales)
    return sum((scale // scales[0]) ** 2 for scale in scales[:-1]) + grid[0] * grid[1]


def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] <= 0 or any(b < a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"S2 scales must be positive and ascending, got {scales}")
    return scales


def _check_image(image) -> None:
    if not isinstance(image, PIL.Image.Image):
        raise MediaError(f"tiling takes a PIL image, got a {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise MediaError(f"cannot tile a zero-size image ({image.width}x{image.height})")
