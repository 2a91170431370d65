"""Dynamic-S2 and dynamic (InternVL-style) tiling against re-derivations of the rules written here."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from jvila.processing.errors import MediaError
from jvila.processing.tiling import (
    candidate_grids,
    closest_grid,
    dynamic_s2_tiles,
    dynamic_tiles,
    s2_tile_count,
)


def _expected_grid(width, height, min_tiles, max_tiles, tile_size):
    """The rule in closed form: among the grids at the minimal aspect-ratio distance, in ascending tile
    count, the last one (after the first) whose pixel area is under twice the image's area, else the first."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    grids.sort(key=lambda g: (g[0] * g[1], g[0]))
    distances = [abs(width / height - c / r) for c, r in grids]
    tied = [g for g, d in zip(grids, distances) if d == min(distances)]
    counts = [c * r for c, r in tied]
    # Equal tile counts never tie on realistic sizes, so the order among them cannot matter here.
    assert len(set(counts)) == len(counts), (width, height, tied)
    later = [g for g in tied[1:] if width * height > 0.5 * tile_size**2 * g[0] * g[1]]
    return later[-1] if later else tied[0]


def _random_image(rng, width, height):
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _cut(image, cols, rows, tile):
    """Row-major tiles of the resized image, by array slicing."""
    pixels = np.asarray(image.resize((cols * tile, rows * tile)))
    return [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize("min_tiles,max_tiles", [(9, 12), (1, 12), (1, 6), (4, 4)])
def test_candidate_grids(min_tiles, max_tiles):
    grids = candidate_grids(min_tiles, max_tiles)
    expected = {(c, r) for c in range(1, 50) for r in range(1, 50) if min_tiles <= c * r <= max_tiles}
    assert set(grids) == expected and len(grids) == len(expected)
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts)


@pytest.mark.parametrize("min_tiles,max_tiles", [(9, 12), (1, 12)])
def test_grid_choice_matches_the_rule(min_tiles, max_tiles):
    rng = np.random.default_rng()
    tile = 448
    candidates = candidate_grids(min_tiles, max_tiles)
    # Random sizes (odd, extreme aspect ratios) plus exact ratios of candidate grids, small and large.
    sizes = [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(400)]
    for c, r in candidates:
        k = int(rng.integers(1, 900))
        sizes += [(c * k, r * k), (c, r)]
    for width, height in sizes:
        got = closest_grid(width, height, candidates, tile)
        assert got == _expected_grid(width, height, min_tiles, max_tiles, tile), (width, height)


def test_tie_rule_prefers_more_tiles_for_larger_images():
    candidates = candidate_grids(1, 12)
    # A square image ties 1x1, 2x2 and 3x3 exactly; 2x2 needs area > 2 * 448**2 = 401408, 3x3 > 903168.
    assert closest_grid(100, 100, candidates, 448) == (1, 1)
    assert closest_grid(633, 633, candidates, 448) == (1, 1)  # 400689: just under
    assert closest_grid(634, 634, candidates, 448) == (2, 2)  # 401956: just over
    assert closest_grid(700, 700, candidates, 448) == (2, 2)
    assert closest_grid(950, 950, candidates, 448) == (2, 2)  # 902500: just under
    assert closest_grid(951, 951, candidates, 448) == (3, 3)  # 904401: just over


def test_dynamic_s2_tiles_and_grid():
    rng = np.random.default_rng()
    scales, tile = (28, 56, 84), 28  # NVILA's 448/896/1344 shape at a sixteenth of the size
    for width, height in [(131, 97), (40, 173), (84, 84), (1000, 333)]:
        image = _random_image(rng, width, height)
        tiles, grid = dynamic_s2_tiles(image, scales, max_tiles=12, tile_size=tile)
        cols, rows = _expected_grid(width, height, 9, 12, tile)
        assert grid == (rows, cols)
        expected = _cut(image, 1, 1, tile) + _cut(image, 2, 2, tile) + _cut(image, cols, rows, tile)
        assert len(tiles) == len(expected) == s2_tile_count(scales, grid)
        for got, want in zip(tiles, expected):
            assert got.size == (tile, tile)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_dynamic_s2_token_grid_for_nvila_sizes():
    # A 4:3 image at full NVILA scales: 1 + 4 + 12 tiles, last grid 3 rows x 4 cols.
    image = _random_image(np.random.default_rng(), 1344, 1008)
    tiles, grid = dynamic_s2_tiles(image, (448, 896, 1344), max_tiles=12, tile_size=448)
    assert grid == (3, 4) and len(tiles) == 17


def test_dynamic_tiles_with_thumbnail():
    rng = np.random.default_rng()
    tile = 32
    for width, height, max_tiles in [(101, 37, 12), (50, 50, 12), (29, 301, 6), (16, 16, 12)]:
        image = _random_image(rng, width, height)
        tiles = dynamic_tiles(image, min_tiles=1, max_tiles=max_tiles, tile_size=tile)
        cols, rows = _expected_grid(width, height, 1, max_tiles, tile)
        expected = _cut(image, cols, rows, tile)
        if len(expected) > 1:
            expected.append(np.asarray(image.resize((tile, tile))))
        assert len(tiles) == len(expected)
        for got, want in zip(tiles, expected):
            np.testing.assert_array_equal(np.asarray(got), want)
        assert len(dynamic_tiles(image, 1, max_tiles, tile, use_thumbnail=False)) == cols * rows


def test_tiling_errors():
    image = _random_image(np.random.default_rng(), 30, 20)
    with pytest.raises(ValueError, match="below the 9 tiles"):
        dynamic_s2_tiles(image, (448, 896, 1344), max_tiles=8)
    with pytest.raises(ValueError, match="ascending"):
        dynamic_s2_tiles(image, (896, 448))
    with pytest.raises(ValueError, match="min_tiles"):
        dynamic_tiles(image, min_tiles=0)
    with pytest.raises(MediaError, match="zero-size"):
        dynamic_tiles(PIL.Image.new("RGB", (0, 4)))
    with pytest.raises(MediaError, match="PIL image"):
        dynamic_s2_tiles(np.zeros((4, 4, 3)))
