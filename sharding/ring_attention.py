"""Ring attention over one mesh axis: K/V blocks travel round the ring, partials merge by lse.

Call `ring_attention` inside `jax.shard_map`. Device r of the ring axis holds its own shard of the
sequence for q, k, v and the segment ids. Which global tokens a shard holds is its `layout`:

- "contiguous": shard r is chunk r of n equal chunks (Liu et al.'s ring attention);
- "zigzag": the sequence is cut into 2n chunks and shard r holds chunks r and 2n-1-r, back to back
  (`sharding.load_balance` permutes a batch into this order once). Under a causal mask every
  device then has the same amount of visible work at every ring step: after the first, exactly
  half of each held block, computed as one unmasked call (which half depends on the origin).

Forward: n steps; at each, one flash call per (local query chunk, held key chunk) pair with that
pair's absolute offsets, merged into the running (out, lse); then K/V and their segment ids move
one device to the right with `ppermute`. Backward (custom VJP, so no step's K/V is kept alive):
K/V go round again, and each step's block gradient is the VJP of the same flash call given the
cotangents the merge passes to that partial; dK/dV accumulate in float32 and travel with their
block, arriving home after n moves. dQ stays local. Memory is one block per step either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.flash_attention import (
    flash_attention_with_lse,
    merge_attention_partials,
)

LAYOUTS = ("contiguous", "zigzag")
ATTENTION_OUT, ATTENTION_LSE = "attention_out", "attention_lse"


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    axis_name: str
    causal: bool
    layout: str
    sm_scale: float | None
    implementation: str | None


def _chunk_starts(rank, ring_size, layout, chunk_len):
    """Absolute start positions (traced int32) of the chunks a device holds, in its local order."""
    if layout == "contiguous":
        return [rank * chunk_len]
    return [rank * chunk_len, (2 * ring_size - 1 - rank) * chunk_len]


def _split(x, pieces, axis=1):
    if x is None:
        return [None] * pieces
    return jnp.split(x, pieces, axis=axis)


def _block_attention(q, k, v, q_seg, kv_seg, me, origin, cfg: _RingConfig, step: int = 0):
    """Local queries against the K/V block that started on device `origin`: (out, lse)."""
    if cfg.layout == "zigzag" and cfg.causal and step > 0:
        return _zigzag_off_diagonal(q, k, v, q_seg, kv_seg, me, origin, cfg)
    n = lax.axis_size(cfg.axis_name)
    pieces = 1 if cfg.layout == "contiguous" else 2
    chunk = q.shape[1] // pieces
    q_starts = _chunk_starts(me, n, cfg.layout, chunk)
    kv_starts = _chunk_starts(origin, n, cfg.layout, chunk)
    outs, lses = [], []
    for qc, qs, q_start in zip(_split(q, pieces), _split(q_seg, pieces), q_starts):
        out = lse = None
        for kc, vc, ks, kv_start in zip(_split(k, pieces), _split(v, pieces), _split(kv_seg, pieces), kv_starts):
            part = flash_attention_with_lse(qc, kc, vc, causal=cfg.causal, sm_scale=cfg.sm_scale,
                                            q_segment_ids=qs, kv_segment_ids=ks, q_offset=q_start,
                                            kv_offset=kv_start, implementation=cfg.implementation)
            out, lse = part if out is None else merge_attention_partials(out, lse, *part)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _zigzag_off_diagonal(q, k, v, q_seg, kv_seg, me, origin, cfg: _RingConfig):
    """A zigzag block from another device under a causal mask: exactly half of it is visible, so
    one unmasked call does it (this is what balances the ring). Device r holds chunks r and
    2n-1-r; for origin o < r, the early chunk o is seen by both local chunks and the late chunk
    2n-1-o by neither; for o > r, only the local late chunk 2n-1-r sees anything, and sees both
    of o's chunks."""
    half = q.shape[1] // 2
    common = dict(causal=False, sm_scale=cfg.sm_scale, implementation=cfg.implementation)

    def early():  # all local queries against the origin's early chunk
        return flash_attention_with_lse(q, k[:, :half], v[:, :half], q_segment_ids=q_seg,
                                        kv_segment_ids=None if kv_seg is None else kv_seg[:, :half], **common)

    def late():  # the local late chunk against all of the origin's keys; the early chunk sees nothing
        late_seg = None if q_seg is None else q_seg[:, half:]
        out, lse = flash_attention_with_lse(q[:, half:], k, v, q_segment_ids=late_seg, kv_segment_ids=kv_seg,
                                            **common)
        out = jnp.concatenate([jnp.zeros_like(out), out], axis=1)
        return out, jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=2)

    return lax.cond(origin < me, early, late)


def _rotate(x, axis_name):
    n = lax.axis_size(axis_name)
    return None if x is None else lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_seg, kv_seg, cfg: _RingConfig):
    return _ring_forward(q, k, v, q_seg, kv_seg, cfg)


def _ring_forward(q, k, v, q_seg, kv_seg, cfg):
    n = lax.axis_size(cfg.axis_name)
    me = lax.axis_index(cfg.axis_name)
    out = lse = None
    for step in range(n):
        origin = lax.rem(me - step + n, n)
        part = _block_attention(q, k, v, q_seg, kv_seg, me, origin, cfg, step)
        out, lse = part if out is None else merge_attention_partials(out, lse, *part)
        if step < n - 1:
            k, v, kv_seg = (_rotate(x, cfg.axis_name) for x in (k, v, kv_seg))
    return out, lse


def _ring_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _ring_forward(q, k, v, q_seg, kv_seg, cfg)
    # Named so that a remat policy can keep them (sharding.remat, LightSeq): the backward needs
    # only these and q, k, v, so a rematerialised layer never repeats the ring's forward.
    out, lse = checkpoint_name(out, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    n = lax.axis_size(cfg.axis_name)
    me = lax.axis_index(cfg.axis_name)
    d_out = d_out.astype(jnp.float32)
    d_lse = d_lse.astype(jnp.float32)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for step in range(n):
        origin = lax.rem(me - step + n, n)
        block = functools.partial(_block_attention, q_seg=q_seg, kv_seg=kv_seg, me=me, origin=origin, cfg=cfg,
                                  step=step)
        (part_out, part_lse), vjp = jax.vjp(block, q, k, v)
        # out = sum_i w_i out_i with w_i = exp(lse_i - lse), lse = logsumexp_i lse_i, hence
        # d out_i = w_i d_out and d lse_i = w_i (d_out . (out_i - out) + d_lse).
        weight = jnp.where(jnp.isfinite(part_lse), jnp.exp(part_lse - finite_lse), 0.0)  # [b, h, q]
        weight_rows = jnp.transpose(weight, (0, 2, 1))[..., None]  # [b, q, h, 1]
        row_dot = jnp.sum(d_out * (part_out.astype(jnp.float32) - out.astype(jnp.float32)), axis=-1)
        part_d_lse = weight * (jnp.transpose(row_dot, (0, 2, 1)) + d_lse)
        bq, bk, bv = vjp(((weight_rows * d_out).astype(part_out.dtype), part_d_lse))
        dq = dq + bq.astype(jnp.float32)
        dk = dk + bk.astype(jnp.float32)
        dv = dv + bv.astype(jnp.float32)
        # The accumulated dK/dV travel with their block; after n moves they are back home.
        dk, dv = _rotate(dk, cfg.axis_name), _rotate(dv, cfg.axis_name)
        if step < n - 1:
            k, v, kv_seg = (_rotate(x, cfg.axis_name) for x in (k, v, kv_seg))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, axis_name, causal=True, segment_ids=None, layout="contiguous", sm_scale=None,
                   implementation=None):
    """(out, lse) of the local queries against the whole sequence of the ring axis `axis_name`.

    q [batch, len, q_heads, d], k/v [batch, len, kv_heads, d] and segment_ids [batch, len] are
    this device's shard, laid out as `layout` says (see the module docstring); out is the same
    shard's attention output, lse [batch, q_heads, len] float32. Masks follow
    `flash_attention_reference`: causal by absolute position, and equal segment ids.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"ring attention needs equal local q and kv lengths, got {q.shape[1]} and {k.shape[1]}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"the zigzag layout holds two equal chunks per device; local length {q.shape[1]} is odd")
    cfg = _RingConfig(axis_name, bool(causal), layout, sm_scale, implementation)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return _ring(q, k, v, seg, seg, cfg)
