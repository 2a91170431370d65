"""The SigLIP vision transformer in flax.nnx, read out at a chosen layer (NVILA reads the second-to-last).

Pre-LN encoder layers over patch embeddings plus learned position embeddings; no class token.
Parameters carry logical axis names like the decoder's (`jvila.models.llm`) and are stored
[in, ..., out] with heads as their own axis. Pixels come in NHWC float32, already normalized.
The layers after the read-out layer, the post-LayerNorm and the optional pooling head are kept
as parameters (checkpoints round-trip) but are not run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.models.llm import _param
from jvila.vision_config import SIGLIP_ACTIVATIONS, SiglipConfig


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = _param(None, (dim,), ("norm",), dtype, fill=1.0)
        self.bias = _param(None, (dim,), ("norm",), dtype, fill=0.0)
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def layer_norm(x, scale, bias, eps):
    """LayerNorm with float32 statistics, whatever the activation dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    out = centered * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biases on every projection."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype):
        e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", _param(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), dtype))
            setattr(self, f"{name}_bias", _param(None, (h, d), ("q_heads", "head_dim"), dtype, fill=0.0))
        self.o_proj = _param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), dtype)
        self.o_bias = _param(None, (e,), ("embed",), dtype, fill=0.0)

    def __call__(self, x):
        dt = x.dtype
        n, t, e = x.shape

        def project(w, b):
            w = w[...].astype(dt)
            return (x @ w.reshape(e, -1)).reshape(n, t, *w.shape[1:]) + b[...].astype(dt)

        q, k, v = (project(w, b) for w, b in ((self.q_proj, self.q_bias), (self.k_proj, self.k_bias),
                                              (self.v_proj, self.v_bias)))
        # Scores and softmax in float32 (the reference keeps fp32 softmax for half-precision inputs too).
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
        o_proj = self.o_proj[...].astype(dt)
        return out.reshape(n, t, -1) @ o_proj.reshape(-1, e) + self.o_bias[...].astype(dt)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = _param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.fc1_bias = _param(None, (m,), ("mlp",), dtype, fill=0.0)
        self.fc2 = _param(rngs, (m, e), ("mlp", "embed"), dtype)
        self.fc2_bias = _param(None, (e,), ("embed",), dtype, fill=0.0)
        self.tanh_gelu = SIGLIP_ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        dt = x.dtype
        h = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=self.tanh_gelu)
        return h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PoolingHead(nnx.Module):
    """SigLIP's attention-pooling head, stored (in the reference's own layout) but never run here."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype):
        e = cfg.hidden_size
        self.probe = _param(rngs, (e,), ("embed",), dtype)
        self.in_proj = _param(rngs, (e, 3 * e), ("embed", None), dtype)
        self.in_proj_bias = _param(None, (3 * e,), (None,), dtype, fill=0.0)
        self.out_proj = _param(rngs, (e, e), ("embed", None), dtype)
        self.out_proj_bias = _param(None, (e,), (None,), dtype, fill=0.0)
        self.norm = LayerNorm(e, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype)


class SiglipVisionTower(nnx.Module):
    """pixels [n, H, W, 3] → hidden states after `select_layer` [n, (H/p)·(W/p), hidden]."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32):
        self.config = cfg
        self.compute_dtype = compute_dtype
        e, p = cfg.hidden_size, cfg.patch_size
        # Patch kernel [p, p, 3, hidden]: rows, columns, channels in the order NHWC patches flatten.
        self.patch_embed = _param(rngs, (p, p, 3, e), ("patch", "patch", "channels", "embed"), param_dtype)
        self.patch_bias = _param(None, (e,), ("embed",), param_dtype, fill=0.0)
        self.position_embed = _param(rngs, (cfg.grid_size**2, e), ("positions", "embed"), param_dtype)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs, dtype=param_dtype) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(e, cfg.layer_norm_eps, dtype=param_dtype)
        if cfg.use_head:
            self.head = PoolingHead(cfg, rngs=rngs, dtype=param_dtype)

    def layers_to_run(self, select_layer: int) -> int:
        """hidden_states[select_layer] (embeddings output first) is the output of this many layers."""
        n = self.config.num_layers
        count = select_layer if select_layer >= 0 else n + 1 + select_layer
        if not 0 <= count <= n:
            raise ValueError(f"select_layer {select_layer} is out of range for a {n}-layer tower")
        return count

    def __call__(self, pixels: jax.Array, *, select_layer: int = -2) -> jax.Array:
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be NHWC [n, H, W, 3], got shape {tuple(pixels.shape)}")
        n, height, width, _ = pixels.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        gh, gw = height // p, width // p
        dt = self.compute_dtype
        patches = pixels.astype(dt).reshape(n, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, gh * gw, p * p * 3)
        x = patches @ self.patch_embed[...].astype(dt).reshape(p * p * 3, -1) + self.patch_bias[...].astype(dt)
        x = x + position_embeddings(self.position_embed[...], cfg.grid_size, gh, gw).astype(dt)[None]
        for layer in list(self.layers)[: self.layers_to_run(select_layer)]:
            x = layer(x)
        return x


def position_embeddings(table: jax.Array, grid: int, rows: int, cols: int) -> jax.Array:
    """The [rows·cols, hidden] position embeddings for a rows x cols patch grid.

    At the trained grid the table itself; otherwise it is resized as transformers'
    `interpolate_pos_encoding` does (torch bicubic, align_corners=False), as two matrix products.
    """
    if (rows, cols) == (grid, grid):
        return table
    square = table.astype(jnp.float32).reshape(grid, grid, -1)
    hi = jax.lax.Precision.HIGHEST  # resampling weights must not be rounded to TF32 on GPUs
    out = jnp.einsum("ri,ijc->rjc", jnp.asarray(bicubic_matrix(grid, rows)), square, precision=hi)
    out = jnp.einsum("cj,rjd->rcd", jnp.asarray(bicubic_matrix(grid, cols)), out, precision=hi)
    return out.reshape(rows * cols, -1).astype(table.dtype)


def bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """[size_out, size_in] weights of torch's 1-D bicubic resize (align_corners=False, edge clamped)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = scale * (i + 0.5) - 0.5  # torch does not clamp the source index for cubic modes
        base = int(np.floor(src))
        t = src - base
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            weights[i, min(max(base + offset, 0), size_in - 1)] += w
    return weights.astype(np.float32)
