"""Rotary position embedding in the Hugging Face (rotate-half) layout, with its frequency scalings."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jvila.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], computed in float64 then rounded once."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        inv = _llama3_scaled(inv, rope)
    return inv.astype(np.float32)


def _llama3_scaled(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * inv / rope.factor + smooth * inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    in_band = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(in_band, blended, scaled)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, head_dim] by angles positions [batch, seq] × inv_freq, in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
