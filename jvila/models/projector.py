"""NVILA's multimodal projectors: vision feature maps → LLM-width tokens.

Each `mm_projector_type` is a sequence of layers exactly as VILA's `MultimodalProjector` builds its
`nn.Sequential` (so the layer index is the checkpoint's `layers.N`): spatial-to-channel
compression (k x k neighbours stacked on channels, zero-padded to a multiple of k), LayerNorm
(eps 1e-5), Linear and exact-erf GELU. Input is a feature map [n, h, w, C]; output [n, tokens, D]
with tokens in row-major order of the (compressed) map.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jvila.models.llm import _param
from jvila.models.siglip import layer_norm

PROJECTOR_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which VILA's projectors use

FIXED_TYPES = ("identity", "linear", "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix",
               "mlp_downsample_3x3_s2", "mlp_downsample_3x3_s2_new")


class LayerSpec(NamedTuple):
    kind: str  # "spatial_to_channel", "layer_norm", "linear", "gelu"
    size: int = 0  # k for spatial_to_channel, the width for layer_norm
    in_dim: int = 0  # linear only
    out_dim: int = 0


def projector_layers(projector_type: str, c: int, d: int) -> tuple[LayerSpec, ...]:
    """The layers of `projector_type` from mm_hidden_size `c` to the LLM width `d`, in Sequential order."""
    stc, ln, gelu = (lambda k: LayerSpec("spatial_to_channel", k)), (lambda n: LayerSpec("layer_norm", n)), \
        LayerSpec("gelu")
    lin = lambda i, o: LayerSpec("linear", in_dim=i, out_dim=o)  # noqa: E731
    if projector_type == "identity":
        if c != d:
            raise ValueError(f"identity projector needs equal widths, got {c} and {d}")
        return ()
    if projector_type == "linear":
        return (lin(c, d),)
    if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return (stc(2), ln(4 * c), lin(4 * c, d), gelu, lin(d, d))
    if projector_type == "mlp_downsample_3x3_fix":
        return (stc(3), ln(9 * c), lin(9 * c, 3 * c), gelu, ln(3 * c), lin(3 * c, d), gelu, lin(d, d))
    if projector_type == "mlp_downsample_3x3_s2":
        widths = (9 * c, 3 * c, c, c // 3)
    elif projector_type == "mlp_downsample_3x3_s2_new":
        widths = (9 * c, 4 * c, 2 * c, c, c // 3)
    else:
        match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"unknown mm_projector_type {projector_type!r}; known: {', '.join(FIXED_TYPES)}, "
                             "mlp<N>x_gelu")
        layers = [lin(c, d)]
        for _ in range(1, int(match.group(1))):
            layers += [gelu, lin(d, d)]
        return tuple(layers)
    # The deeper 3x3 stacks: LN → Linear → GELU down the widths, then Linear(→d) → GELU → Linear(d→d).
    layers = [stc(3)]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [ln(w_in), lin(w_in, w_out), gelu]
    layers += [ln(widths[-1]), lin(widths[-1], d), gelu, lin(d, d)]
    return tuple(layers)


def downsample_rate(projector_type: str) -> int:
    """k of the projector's k x k spatial-to-channel step (1 when it has none)."""
    # Widths do not change the layer kinds; 9 suits every type (identity needs equal widths).
    stc = [s.size for s in projector_layers(projector_type, 9, 9) if s.kind == "spatial_to_channel"]
    return stc[0] if stc else 1


def tokens_per_map(projector_type: str, h: int, w: int) -> int:
    """How many tokens an h x w feature map becomes."""
    k = downsample_rate(projector_type)
    return -(-h // k) * -(-w // k)


def spatial_to_channel(x: jax.Array, k: int) -> jax.Array:
    """[n, h, w, c] → [n, ⌈h/k⌉, ⌈w/k⌉, k·k·c]: each k x k neighbourhood stacked on channels.

    Channel order is (row offset, column offset, channel), as VILA's `flat_square_*` produce; sides
    that k does not divide are zero-padded at the bottom/right first.
    """
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % k), (0, -w % k), (0, 0)))
    hk, wk = x.shape[1] // k, x.shape[2] // k
    x = x.reshape(n, hk, k, wk, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hk, wk, k * k * c)


class _SpatialToChannel(nnx.Module):
    def __init__(self, k: int):
        self.k = k

    def __call__(self, x):
        return spatial_to_channel(x, self.k)


class _Gelu(nnx.Module):
    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class _LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, dtype):
        self.scale = _param(None, (dim,), ("norm",), dtype, fill=1.0)
        self.bias = _param(None, (dim,), ("norm",), dtype, fill=0.0)

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], PROJECTOR_LAYER_NORM_EPS)


class _Linear(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype):
        self.kernel = _param(rngs, (in_dim, out_dim), ("mm_in", "mm_out"), dtype)
        self.bias = _param(None, (out_dim,), ("mm_out",), dtype, fill=0.0)

    def __call__(self, x):
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class Projector(nnx.Module):
    """feature maps [n, h, w, mm_hidden] → tokens [n, tokens, llm hidden]."""

    def __init__(self, projector_type: str, in_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, compute_dtype=jnp.float32):
        self.projector_type = projector_type
        self.compute_dtype = compute_dtype
        self.in_dim = in_dim
        specs = projector_layers(projector_type, in_dim, out_dim)
        self.layers = nnx.List([_build(s, rngs=rngs, dtype=param_dtype) for s in specs])

    def __call__(self, maps: jax.Array) -> jax.Array:
        if maps.ndim != 4 or maps.shape[-1] != self.in_dim:
            raise ValueError(f"projector {self.projector_type!r} takes feature maps [n, h, w, {self.in_dim}], "
                             f"got shape {tuple(maps.shape)}")
        x = maps.astype(self.compute_dtype)
        for layer in self.layers:
            x = layer(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def _build(spec: LayerSpec, *, rngs, dtype) -> nnx.Module:
    if spec.kind == "spatial_to_channel":
        return _SpatialToChannel(spec.size)
    if spec.kind == "layer_norm":
        return _LayerNorm(spec.size, dtype=dtype)
    if spec.kind == "linear":
        return _Linear(spec.in_dim, spec.out_dim, rngs=rngs, dtype=dtype)
    return _Gelu()
