"""Projectors against independent references: NumPy loops for spatial-to-channel, torch for the layer stacks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jvila.checkpoints.vision_mapping import projector_hf_to_jvila, projector_jvila_to_hf
from jvila.models.nvila import load_params
from jvila.models.projector import Projector, spatial_to_channel, tokens_per_map

# float32 on both sides with different op orders: errors seen 1e-7..1e-5 of the largest output (the deep
# 3x3_s2 stack renormalizes narrow LayerNorms four times, which amplifies rounding);
# a wrong channel order or layer index gives errors of order 1.
RTOL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def stc_reference(x, k):
    """Spatial-to-channel by explicit loops: token (i, j) holds rows k·i.., cols k·j.. in row-major offset order."""
    n, h, w, c = x.shape
    hk, wk = -(-h // k), -(-w // k)
    out = np.zeros((n, hk, wk, k * k * c), x.dtype)
    for i in range(hk):
        for j in range(wk):
            for p1 in range(k):
                for p2 in range(k):
                    r, col = k * i + p1, k * j + p2
                    if r < h and col < w:  # beyond the map: the zero padding
                        slot = (p1 * k + p2) * c
                        out[:, i, j, slot:slot + c] = x[:, r, col]
    return out


@pytest.mark.parametrize("k,shape", [(2, (2, 6, 6, 3)), (2, (1, 7, 5, 4)), (3, (2, 9, 9, 2)), (3, (1, 8, 7, 3)),
                                     (3, (1, 32, 32, 2))])
def test_spatial_to_channel_matches_loops(k, shape):
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(spatial_to_channel(jnp.asarray(x), k)), stc_reference(x, k))


class TorchSTC(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):  # [n, h, w, c] → [n, tokens, k·k·c]
        out = stc_reference(x.numpy(), self.k)
        return torch.tensor(out.reshape(out.shape[0], -1, out.shape[-1]))


class Flatten(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TorchProjector(torch.nn.Module):
    """Holds the stack as `layers`, the attribute VILA's MultimodalProjector saves it under."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


def torch_projector(kind, c, d):
    return TorchProjector(torch_layers(kind, c, d))


def torch_layers(kind, c, d):
    """The projector stacks as VILA's base_projector.py lays them out, written out per type."""
    L, LN, G = torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU
    if kind == "linear":
        return L(c, d)
    if kind == "mlp1x_gelu":
        return torch.nn.Sequential(L(c, d))
    if kind == "mlp3x_gelu":
        return torch.nn.Sequential(L(c, d), G(), L(d, d), G(), L(d, d))
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return torch.nn.Sequential(TorchSTC(2), LN(4 * c), L(4 * c, d), G(), L(d, d))
    if kind == "mlp_downsample_3x3_fix":
        return torch.nn.Sequential(TorchSTC(3), LN(9 * c), L(9 * c, 3 * c), G(), LN(3 * c), L(3 * c, d), G(),
                                   L(d, d))
    if kind == "mlp_downsample_3x3_s2":
        return torch.nn.Sequential(TorchSTC(3), LN(9 * c), L(9 * c, 3 * c), G(), LN(3 * c), L(3 * c, c), G(),
                                   LN(c), L(c, c // 3), G(), LN(c // 3), L(c // 3, d), G(), L(d, d))
    raise AssertionError(kind)


KINDS = ["linear", "mlp1x_gelu", "mlp3x_gelu", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix",
         "mlp_downsample_3x3_s2"]


@pytest.mark.parametrize("kind", KINDS)
def test_projector_matches_torch_stack(kind):
    c, d = 12, 10
    torch.manual_seed(len(kind))
    ref = torch_projector(kind, c, d).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 if name.endswith("weight") and p.ndim == 1 else 0.0) + 0.3 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = projector_hf_to_jvila(sd, kind, c, d)
    proj = Projector(kind, c, d, rngs=nnx.Rngs(0))
    load_params(proj, params, prefix="projector.")
    # Sides that 2 and 3 do not divide: the zero padding is part of what is compared.
    maps = np.random.default_rng(5).normal(size=(2, 7, 7, c)).astype(np.float32)
    with torch.no_grad():
        x = torch.tensor(maps)
        want = ref(x.reshape(2, -1, c) if "downsample" not in kind else x).numpy()
    got = np.asarray(proj(jnp.asarray(maps)))
    assert got.shape == want.shape == (2, tokens_per_map(kind, 7, 7), d)
    assert rel_err(got, want) < RTOL
    back = projector_jvila_to_hf(params, kind, c, d)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_checkpoint_names_are_vilas_sequential_indices():
    names = set(projector_jvila_to_hf(
        {f"projector.layers.{i}.{p}": np.zeros(1) for i in range(5) for p in ("kernel", "bias", "scale")},
        "mlp_downsample_2x2_fix", 4, 4))
    assert names == {"layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight",
                     "layers.4.bias"}


def test_token_counts():
    assert tokens_per_map("mlp_downsample_2x2_fix", 32, 32) == 256
    assert tokens_per_map("mlp_downsample_3x3_fix", 32, 32) == 121
    assert tokens_per_map("linear", 32, 32) == 1024


def test_unknown_type_and_bad_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mm_projector_type 'mlp_fancy'"):
        Projector("mlp_fancy", 4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="identity projector needs equal widths"):
        Projector("identity", 4, 5, rngs=nnx.Rngs(0))
    proj = Projector("mlp_downsample_2x2_fix", 4, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"feature maps \[n, h, w, 4\]"):
        proj(jnp.ones((1, 16, 4)))
