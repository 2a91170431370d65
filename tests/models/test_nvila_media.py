"""NVILA media paths against independent NumPy references and torch: area resize, Dynamic-S2 merge,
temporal pooling, end tokens, prompt splicing, token counts and bad input."""

import functools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jvila.config import LLMConfig
from jvila.models import nvila
from jvila.models.params import flat_params
from jvila.vision_config import NVILAConfig, SiglipConfig, video_pool_sizes_from_encoder

IMAGE_ID, VIDEO_ID, NEWLINE_ID, OTHER_END_ID = 40, 41, 7, 9

# Tower: 64 px tiles in 2 px patches give the real 32x32 feature maps (so token counts are NVILA's),
# with one layer read out at -2: no encoder layer runs, which keeps 64 frames cheap. The layers
# themselves are checked against transformers in test_siglip_parity.py.
VISION = SiglipConfig(hidden_size=6, intermediate_size=10, num_layers=1, num_heads=2, image_size=64, patch_size=2)
LLM = LLMConfig(vocab_size=53, hidden_size=20, intermediate_size=28, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=10, family="qwen2")


def make_config(**kw):
    base = dict(llm=LLM, vision=VISION, projector_type="mlp_downsample_2x2_fix", s2_scales=(64, 128, 192),
                s2_max_split_size=64, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                media_end_token_ids=(NEWLINE_ID,), video_pool_sizes=((8, 1, 1),))
    return NVILAConfig(**{**base, **kw})


@functools.cache
def model_for(**kw):
    # Every parameter random (norm scales and biases too) so none goes unchecked; drawn in NumPy
    # into the shape-only model, which costs no compilations.
    cfg = make_config(**kw)
    rng = np.random.default_rng(4)
    shapes = flat_params(nvila.abstract_nvila(cfg))
    return nvila.nvila_from_params(cfg, {k: 0.3 * rng.normal(size=v.shape) for k, v in shapes.items()})


@pytest.fixture(scope="module")
def model():
    return model_for()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiles(n, seed, size=64):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------- area resize


def area_reference(x, out_h, out_w):
    """Adaptive average pooling by its definition: output (i, j) is the mean of the input rows
    [floor(i·h/H), ceil((i+1)·h/H)) and columns likewise, computed in float64."""
    h, w = x.shape[:2]
    out = np.zeros((out_h, out_w, x.shape[2]))
    for i in range(out_h):
        for j in range(out_w):
            r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
            c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[i, j] = x[r0:r1, c0:c1].astype(np.float64).mean(axis=(0, 1))
    return out


# Ratios Dynamic-S2 produces (448/896-scale maps of 32/64 onto last-scale maps of 32·rows x 32·cols,
# rows·cols in 9..12), plus shrinking and odd sizes.
SIZES = [((32, 32), (96, 96)), ((64, 64), (96, 128)), ((32, 32), (96, 128)), ((64, 64), (32, 384)),
         ((64, 64), (288, 32)), ((7, 10), (10, 7)), ((5, 5), (5, 5))]


@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_area_resize_matches_torch_and_definition(size_in, size_out):
    x = np.random.default_rng(sum(size_in + size_out)).normal(size=(*size_in, 5)).astype(np.float32)
    got = np.asarray(nvila.area_resize(jnp.asarray(x), *size_out))
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(torch.tensor(x).permute(2, 0, 1)[None], size=size_out, mode="area")
    # Same windows; only the float32 summation order differs (a few ulps).
    assert rel_err(got, ref[0].permute(1, 2, 0).numpy()) < 1e-6
    assert rel_err(got, area_reference(x, *size_out)) < 1e-6


def test_area_resize_by_whole_factor_repeats():
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(nvila.area_resize(jnp.asarray(x), 12, 9)),
                                  x.repeat(3, axis=0).repeat(3, axis=1))


# ---------------------------------------------------------------- Dynamic-S2


def s2_reference(features, scales, grid, project, resize_index=-1):
    """VILA's merge by hand: tiles placed by explicit loops, area-resized per scale to the map of
    scale `resize_index`, concatenated, cut into that scale's blocks, each projected, and the token
    maps laid side by side."""
    g, c = features.shape[1], features.shape[3]
    grids = [(s // scales[0],) * 2 for s in scales[:-1]] + [grid]
    maps, k = [], 0
    for rows, cols in grids:
        m = np.zeros((rows * g, cols * g, c), np.float32)
        for i in range(rows):
            for j in range(cols):
                m[i * g:(i + 1) * g, j * g:(j + 1) * g] = features[k]
                k += 1
        maps.append(m)
    assert k == len(features)
    big_h, big_w = maps[resize_index].shape[:2]
    merged = np.concatenate([area_reference(m, big_h, big_w) for m in maps], axis=-1).astype(np.float32)
    rows, cols = grids[resize_index]
    out = None
    for i in range(rows):
        for j in range(cols):
            tokens = project(merged[i * g:(i + 1) * g, j * g:(j + 1) * g])
            side = int(len(tokens) ** 0.5)
            if out is None:
                out = np.zeros((rows * side, cols * side, tokens.shape[-1]), np.float32)
            out[i * side:(i + 1) * side, j * side:(j + 1) * side] = tokens.reshape(side, side, -1)
    return out.reshape(-1, out.shape[-1])


def project_one(model, block):
    return np.asarray(model.projector(jnp.asarray(block[None])))[0]


def test_dynamic_s2_matches_reference(model):
    grid = (3, 4)
    pixels = tiles(1 + 4 + 12, seed=1)
    features = np.asarray(nvila.feature_maps(model, pixels))
    want = s2_reference(features, model.config.s2_scales, grid, functools.partial(project_one, model))
    got = np.asarray(nvila.dynamic_s2_tokens(model, pixels, grid))
    assert got.shape == (3072, LLM.hidden_size)  # 12 blocks x 256 tokens, NVILA's count for a 3x4 grid
    # float32 resize sums in another order, then LayerNorm and two linears: errors seen ~1e-6.
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("resize_index", [0, 1])
def test_dynamic_s2_to_a_smaller_scale_matches_reference(resize_index):
    """VILA's default s2_resize_output_to_scale_idx is 0: every scale shrinks to the first scale's map."""
    model = model_for(s2_resize_output_to_scale_idx=resize_index)
    grid = (2, 5)
    pixels = tiles(1 + 4 + 10, seed=9)
    features = np.asarray(nvila.feature_maps(model, pixels))
    want = s2_reference(features, model.config.s2_scales, grid, functools.partial(project_one, model), resize_index)
    got = np.asarray(nvila.dynamic_s2_tokens(model, pixels, grid))
    assert got.shape == ((1, 4)[resize_index] * 256, LLM.hidden_size)
    assert nvila.image_token_count(model.config, grid) == got.shape[0] + 1
    assert rel_err(got, want) < 1e-4


def test_dynamic_s2_block_count_and_errors(model):
    pixels = tiles(1 + 4 + 9, seed=2)
    blocks = nvila.image_blocks(model, pixels, grid=(3, 3))
    assert [b.shape for b in blocks] == [(9 * 256 + 1, LLM.hidden_size)]
    assert nvila.image_token_count(model.config, (3, 3)) == 9 * 256 + 1
    with pytest.raises(ValueError, match=r"3x4 last-scale grid needs 17 tiles, got 14"):
        nvila.image_blocks(model, pixels, grid=(3, 4))
    with pytest.raises(ValueError, match="must be 64x64"):
        nvila.image_blocks(model, tiles(14, seed=2, size=32), grid=(3, 3))
    with pytest.raises(ValueError, match="NHWC"):
        nvila.image_blocks(model, np.zeros((14, 64, 64)), grid=(3, 3))


def test_single_tile_repeats_features_per_scale(model):
    """A lone 448 tile under a Dynamic-S2 model: its features stand for every scale on channels."""
    pixels = tiles(2, seed=3)
    features = np.asarray(nvila.feature_maps(model, pixels))
    blocks = nvila.image_blocks(model, pixels)
    end = np.asarray(model.llm.embed_tokens(jnp.asarray([NEWLINE_ID])))
    assert len(blocks) == 2
    for f, block in zip(features, blocks):
        want = project_one(model, np.concatenate([f, f, f], axis=-1))
        assert block.shape == (256 + 1, LLM.hidden_size)
        assert rel_err(block[:-1], want) < 1e-5
        np.testing.assert_array_equal(np.asarray(block[-1:]), end)


def test_lite_tiles_are_one_block_each_with_3x3_compression():
    model = model_for(projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic", dynamic_s2=False)
    assert model.config.mm_hidden_size == VISION.hidden_size
    pixels = tiles(3, seed=4)
    blocks = nvila.image_blocks(model, pixels)
    features = np.asarray(nvila.feature_maps(model, pixels))
    assert [b.shape[0] for b in blocks] == [121 + 1] * 3 == [nvila.image_token_count(model.config)] * 3
    for f, block in zip(features, blocks):
        assert rel_err(block[:-1], project_one(model, f)) < 1e-5


# ---------------------------------------------------------------- video


def pool_reference(tokens, pool):
    """Means over (frames, rows, cols) windows by explicit loops over the windows."""
    frames, s, d = tokens.shape
    side = int(s ** 0.5)
    pt, ph, pw = pool
    maps = tokens.reshape(frames, side, side, d)
    out = np.zeros((frames // pt, side // ph, side // pw, d))
    for t in range(frames // pt):
        for i in range(side // ph):
            for j in range(side // pw):
                out[t, i, j] = maps[t * pt:(t + 1) * pt, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].mean(axis=(0, 1, 2))
    return out.reshape(frames // pt, -1, d)


@pytest.mark.parametrize("pool", [(8, 1, 1), (2, 2, 2), (3, 1, 2)])
def test_temporal_pool_matches_loops(pool):
    tokens = np.random.default_rng(sum(pool)).normal(size=(24, 16, 5)).astype(np.float32)
    got = np.asarray(nvila.temporal_pool(jnp.asarray(tokens), pool))
    assert rel_err(got, pool_reference(tokens, pool)) < 1e-6


def test_video_of_64_frames_is_8_groups_of_256_plus_newline(model):
    frames = tiles(64, seed=5)
    block = np.asarray(nvila.video_block(model, frames))
    assert block.shape == (8 * (256 + 1), LLM.hidden_size)
    per_frame = np.stack([project_one(model, np.concatenate([f] * 3, axis=-1))
                          for f in np.asarray(nvila.feature_maps(model, frames))])
    groups = block.reshape(8, 257, -1)
    assert rel_err(groups[:, :256], pool_reference(per_frame, (8, 1, 1))) < 1e-5
    end = np.asarray(model.llm.embed_tokens(jnp.asarray([NEWLINE_ID])))[0]
    assert all(np.array_equal(groups[g, 256], end) for g in range(8))


def test_video_without_pooling_and_with_two_end_tokens():
    model = model_for(video_pool_sizes=(), media_end_token_ids=(NEWLINE_ID, OTHER_END_ID))
    block = np.asarray(nvila.video_block(model, tiles(3, seed=6)))
    assert block.shape == (3 * (256 + 2), LLM.hidden_size)
    end = np.asarray(model.llm.embed_tokens(jnp.asarray([NEWLINE_ID, OTHER_END_ID])))
    for g in range(3):
        np.testing.assert_array_equal(block.reshape(3, 258, -1)[g, 256:], end)


def test_bad_videos_are_clear_errors(model):
    with pytest.raises(ValueError, match="5 frames is shorter than the temporal pool size 8"):
        nvila.video_block(model, tiles(5, seed=7))
    with pytest.raises(ValueError, match="12 frames .* do not divide into pools of 8x1x1"):
        nvila.video_block(model, tiles(12, seed=7))


# ---------------------------------------------------------------- prompt splicing


def test_embed_prompt_splices_blocks_in_order(model):
    d = LLM.hidden_size
    rng = np.random.default_rng(8)
    blocks = [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in (5, 3, 2)]
    ids = [1, 2, IMAGE_ID, 3, VIDEO_ID, IMAGE_ID, 4, 5]
    expanded, embeds, mask = nvila.embed_prompt(model, ids, blocks)
    want_ids = [1, 2] + [IMAGE_ID] * 5 + [3] + [VIDEO_ID] * 3 + [IMAGE_ID] * 2 + [4, 5]
    assert expanded.tolist() == want_ids
    assert mask.tolist() == [t in (IMAGE_ID, VIDEO_ID) for t in want_ids]
    table = np.asarray(model.llm.embed[...])
    want = [table[1], table[2], *np.asarray(blocks[0]), table[3], *np.asarray(blocks[1]), *np.asarray(blocks[2]),
            table[4], table[5]]
    np.testing.assert_array_equal(np.asarray(embeds), np.stack(want))


def test_embed_prompt_without_media_is_the_token_embeddings(model):
    expanded, embeds, mask = nvila.embed_prompt(model, [3, 1, 4, 1, 5], [])
    assert expanded.tolist() == [3, 1, 4, 1, 5] and not mask.any()
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(model.llm.embed[...])[[3, 1, 4, 1, 5]])


def test_embed_prompt_errors(model):
    block = jnp.ones((4, LLM.hidden_size))
    with pytest.raises(ValueError, match="1 media placeholder tokens but 2 media blocks"):
        nvila.embed_prompt(model, [1, IMAGE_ID, 2], [block, block])
    with pytest.raises(ValueError, match="2 media placeholder tokens but 1 media blocks"):
        nvila.embed_prompt(model, [1, IMAGE_ID, VIDEO_ID], [block])
    with pytest.raises(ValueError, match=r"media block 0 must be \[tokens, 20\]"):
        nvila.embed_prompt(model, [IMAGE_ID], [jnp.ones((4, 7))])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 53\)"):
        nvila.embed_prompt(model, [1, 99], [])


# ---------------------------------------------------------------- counts, configs, params


def test_token_counts_at_nvila_sizes():
    so400m = SiglipConfig()  # 448 px, patch 14: 32x32 maps
    base = dict(llm=LLM, vision=so400m, media_end_token_ids=(NEWLINE_ID,))
    assert nvila.image_token_count(NVILAConfig(**base)) == 256 + 1
    assert nvila.image_token_count(NVILAConfig(**base), (3, 4)) == 3072 + 1
    assert nvila.image_token_count(NVILAConfig(**base), (3, 3)) == 2304 + 1
    lite = NVILAConfig(**base, projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic",
                       dynamic_s2=False)
    assert nvila.image_token_count(lite) == 121 + 1
    assert NVILAConfig(**base).mm_hidden_size == 3456 and lite.mm_hidden_size == 1152


def test_config_round_trips_and_reads_vila_settings():
    cfg = make_config()
    assert NVILAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    back = NVILAConfig.from_hf(cfg.to_hf(), llm=LLM, vision=VISION, image_token_id=IMAGE_ID,
                               video_token_id=VIDEO_ID, media_end_token_ids=(NEWLINE_ID,))
    assert back == cfg
    top = {"mm_projector_cfg": {"mm_projector_type": "mlp_downsample_2x2_fix"}, "image_aspect_ratio": "resize",
           "dynamic_s2": True, "s2_scales": "64,128,192", "mm_vision_select_layer": -2,
           "s2_resize_output_to_scale_idx": -1, "num_video_frames": 256,
           "video_encoder": '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}'}
    read = NVILAConfig.from_hf(top, llm=LLM, vision=VISION, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                               media_end_token_ids=(NEWLINE_ID,))
    assert (read.image_aspect_ratio, read.dynamic_s2, read.mm_hidden_size) == ("resize", True, 18)
    assert read.video_pool_sizes == ((8, 1, 1),) and read.num_video_frames == 256
    assert video_pool_sizes_from_encoder('{"_target_": "llava.model.encoders.BasicVideoEncoder"}') == ()
    with pytest.raises(ValueError, match="mm_hidden_size 6, but a 6-wide tower with 3 S2 scales gives 18"):
        NVILAConfig.from_hf({**top, "mm_hidden_size": 6}, llm=LLM, vision=VISION, image_token_id=IMAGE_ID,
                            video_token_id=VIDEO_ID, media_end_token_ids=(NEWLINE_ID,))
    with pytest.raises(ValueError, match="unknown image_aspect_ratio"):
        make_config(image_aspect_ratio="pad")
    with pytest.raises(ValueError, match="first S2 scale 448 must equal the tower's image_size 64"):
        make_config(s2_scales=(448, 896, 1344))
    with pytest.raises(ValueError, match="unsupported video encoder"):
        video_pool_sizes_from_encoder({"_target_": "llava.model.encoders.Other"})


def test_model_rebuilds_from_its_flat_params(model):
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    assert {k.split(".")[0] for k in params} == {"llm", "vision_tower", "projector"}
    again = nvila.nvila_from_params(model.config, params)
    assert all(np.array_equal(np.asarray(v), params[k]) for k, v in flat_params(again).items())
    with pytest.raises(ValueError, match="missing"):
        nvila.nvila_from_params(model.config, {k: v for k, v in params.items() if k != "projector.layers.2.bias"})
