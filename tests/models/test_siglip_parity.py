"""The SigLIP tower against transformers' SiglipVisionModel in float32, and its checkpoint mapping."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SiglipVisionConfig, SiglipVisionModel

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.vision_mapping import siglip_config_for_tensors, siglip_hf_to_jvila, siglip_jvila_to_hf
from jvila.models.params import check_params, flat_params
from jvila.models.siglip import SiglipVisionTower, bicubic_matrix
from jvila.vision_config import SiglipConfig

# Both sides run float32 with different op orders; errors seen are ~1e-6 of the largest value,
# while a wrong layout, norm or activation gives errors of order 1. 1e-4 leaves ~100x headroom.
RTOL = 1e-4

CONFIGS = {
    # Every dimension distinct and not a power of two; 3x3 patch grid; the pooling head present.
    "tiny": dict(hidden_size=36, intermediate_size=52, num_hidden_layers=4, num_attention_heads=3,
                 image_size=42, patch_size=14, vision_use_head=True),
    # So400m/14's widths (1152 / 4304 / 16 heads), cut to 3 layers and a 4x4 patch grid to stay fast.
    "so400m_shaped": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=3, num_attention_heads=16,
                          image_size=56, patch_size=14, vision_use_head=False),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_siglip(name, seed):
    """A transformers SigLIP tower whose every parameter (norm scales and biases too) is random."""
    torch.manual_seed(seed)
    hf = SiglipVisionModel(SiglipVisionConfig(**CONFIGS[name], layer_norm_eps=1e-6)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return hf


def tower_from_hf(hf):
    cfg = SiglipConfig.from_hf(hf.config.to_dict())
    params = siglip_hf_to_jvila({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(tower, nnx.Param)
    prefixed = {"vision_tower." + k: v for k, v in flat_params(state).items()}
    check_params(prefixed, params)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params["vision_tower." + ".".join(str(k) for k in path)]))
    nnx.update(tower, state)
    return cfg, params, tower


@functools.cache
def built(name):
    hf = random_siglip(name, seed=len(name))
    return (name, hf, *tower_from_hf(hf))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return built(request.param)


@pytest.fixture(scope="module")
def tiny():
    return built("tiny")


def reference_hidden_states(hf, pixels_nhwc, interpolate=False):
    with torch.no_grad():
        out = hf(torch.tensor(pixels_nhwc).permute(0, 3, 1, 2), output_hidden_states=True,
                 interpolate_pos_encoding=interpolate)
    return [h.numpy() for h in out.hidden_states]


def test_second_to_last_hidden_state_matches_transformers(pair):
    name, hf, cfg, _, tower = pair
    pixels = np.random.default_rng(1).normal(size=(3, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ref = reference_hidden_states(hf, pixels)
    assert len(ref) == cfg.num_layers + 1
    out = tower(jnp.asarray(pixels), select_layer=-2)
    assert out.shape == (3, cfg.grid_size**2, cfg.hidden_size)
    assert rel_err(out, ref[-2]) < RTOL
    # The read-out layer matters: the next layer's output is far away.
    assert rel_err(out, ref[-1]) > 1e-2


def test_every_select_layer_matches_transformers(tiny):
    _, hf, cfg, _, tower = tiny
    pixels = np.random.default_rng(2).normal(size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ref = reference_hidden_states(hf, pixels)
    for select in (0, 1, -1, -3, cfg.num_layers):
        assert rel_err(tower(jnp.asarray(pixels), select_layer=select), ref[select]) < RTOL, select
    with pytest.raises(ValueError, match="select_layer"):
        tower(jnp.asarray(pixels), select_layer=cfg.num_layers + 1)


def test_position_interpolation_matches_transformers(tiny):
    """A 5x4 patch grid from the 3x3 table, as transformers' `interpolate_pos_encoding` resizes it."""
    _, hf, cfg, _, tower = tiny
    pixels = np.random.default_rng(3).normal(size=(2, 5 * 14, 4 * 14, 3)).astype(np.float32)
    ref = reference_hidden_states(hf, pixels, interpolate=True)
    assert rel_err(tower(jnp.asarray(pixels), select_layer=-2), ref[-2]) < RTOL


def test_bicubic_matrix_matches_torch():
    x = torch.randn(1, 1, 7, 1, dtype=torch.float64)
    for out in (3, 7, 11, 16):
        ref = torch.nn.functional.interpolate(x, size=(out, 1), mode="bicubic", align_corners=False)[0, 0, :, 0]
        got = bicubic_matrix(7, out).astype(np.float64) @ x[0, 0, :, 0].numpy()
        assert np.abs(got - ref.numpy()).max() < 1e-6  # float32 weights


def test_bad_pixels_are_clear_errors(pair):
    _, _, cfg, _, tower = pair
    with pytest.raises(ValueError, match="NHWC"):
        tower(jnp.ones((1, 3, cfg.image_size, cfg.image_size)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower(jnp.ones((1, cfg.image_size + 1, cfg.image_size, 3)))


def test_checkpoint_round_trip_and_errors(pair):
    _, hf, cfg, params, _ = pair
    back = siglip_jvila_to_hf(params, cfg)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    # Written with the `vision_model.` prefix VILA's saved towers use; same tensors bit for bit.
    assert set(back) == {"vision_model." + k for k in sd}
    assert all(np.array_equal(back["vision_model." + k], v) for k, v in sd.items())
    assert all(np.array_equal(v, siglip_hf_to_jvila(back, cfg)[k]) for k, v in params.items())
    with pytest.raises(CheckpointError, match="lacks"):
        siglip_hf_to_jvila({k: v for k, v in sd.items() if "layers.0.mlp.fc1" not in k}, cfg)
    with pytest.raises(CheckpointError, match="does not use"):
        siglip_hf_to_jvila({**sd, "logit_scale": np.ones(1)}, cfg)


def test_config_round_trips_through_hf(pair):
    _, hf, cfg, _, _ = pair
    assert SiglipConfig.from_hf(cfg.to_hf()) == cfg
    assert SiglipConfig.from_hf(SiglipVisionConfig(**cfg.to_hf()).to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipConfig.from_hf({**cfg.to_hf(), "hidden_act": "relu"})


def test_head_presence_is_read_from_the_tensors(pair):
    _, hf, cfg, _, _ = pair
    names = list(hf.state_dict())
    assert siglip_config_for_tensors(cfg, names) == cfg
    headless = [n for n in names if not n.startswith("head.")]
    assert siglip_config_for_tensors(dataclasses.replace(cfg, use_head=True), headless).use_head is False
