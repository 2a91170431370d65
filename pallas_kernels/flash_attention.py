"""Flash attention: a plain-jnp reference, Pallas forward/backward kernels, a dispatch.

Layout is the model's: q ``[batch, q_len, q_heads, head_dim]``, k and v
``[batch, kv_len, kv_heads, head_dim]``, with q_heads a multiple of kv_heads
(GQA/MQA). Repeated K/V heads are never materialised: the reference groups the
query heads, the kernels pick the K/V head in their index maps.

Conventions shared by every implementation here:

* ``lse`` is the natural log-sum-exp of the scaled, masked scores, fp32,
  shape ``[batch, q_heads, q_len]``.
* Causal: the query at absolute position ``q_offset + i`` sees the key at
  ``kv_offset + j`` iff ``kv_offset + j <= q_offset + i``. Offsets may be
  traced, so one ring-attention step is one call with that block's offsets.
* Segment ids ``[batch, len]`` int32: attend only where the ids are equal.
* A row with no visible key (fully masked) has output 0 and ``lse = -inf``;
  ``merge_attention_partials`` treats such a partial as empty.

The Pallas kernels here use the Triton lowering on GPU (explicit Triton compiler
params); on CPU the very same kernel bodies run with ``interpret=True``. The
Mosaic TPU kernels live in ``flash_attention_tpu.py``.
Gradients flow into q, k, v from the cotangents of both ``out`` and ``lse``
(the lse cotangent is folded into the softmax-gradient row term), so merged
ring partials differentiate exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._triton import compiler_params, next_pow2

IMPLEMENTATIONS = (
    "reference", "pallas", "pallas_interpret", "pallas_tpu", "pallas_tpu_interpret", "cudnn", "xla"
)
_LOG2_E = math.log2(math.e)
_LN_2 = math.log(2.0)
# Triton's tensor-core dots need every operand dimension >= 16.
_MIN_BLOCK = 16


# --------------------------------------------------------------------------
# Reference and merge
# --------------------------------------------------------------------------


def _default_scale(head_dim: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def _resolve_segment_ids(q_segment_ids, kv_segment_ids, q_len, kv_len):
    if q_segment_ids is None and kv_segment_ids is None:
        return None, None
    if kv_segment_ids is None and q_len == kv_len:
        kv_segment_ids = q_segment_ids
    if q_segment_ids is None and q_len == kv_len:
        q_segment_ids = kv_segment_ids
    if q_segment_ids is None or kv_segment_ids is None:
        raise ValueError("pass both q_segment_ids and kv_segment_ids when q_len != kv_len")
    return jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(
            f"expected q [b,t,h,d] and equal k/v [b,s,hkv,d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: {q.shape} vs {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q_heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}")


def attention_mask(
    q_len, kv_len, *, causal, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Boolean visibility mask ``[batch or 1, q_len, kv_len]`` (True = may attend)."""
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)
        kv_pos = jnp.asarray(kv_offset, jnp.int32) + jnp.arange(kv_len, dtype=jnp.int32)
        mask = mask & (kv_pos[None, None, :] <= q_pos[None, :, None])
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def flash_attention_reference(
    q, k, v, *, causal=True, sm_scale=None, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0
):
    """Dense attention in plain jnp with an fp32 softmax. Returns ``(out, lse)``."""
    _check_shapes(q, k, v)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = _default_scale(head_dim, sm_scale)
    q_seg, kv_seg = _resolve_segment_ids(q_segment_ids, kv_segment_ids, q_len, kv_len)

    grouped_q = q.reshape(batch, q_len, kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped_q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(
        q_len,
        kv_len,
        causal=causal,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)

    # Shifting by a finite row max keeps fully-masked rows free of inf - inf.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.exp(scores - row_max)
    row_sum = jnp.sum(weights, axis=-1, keepdims=True)
    visible = row_sum > 0
    safe_sum = jnp.where(visible, row_sum, 1.0)
    probs = weights / safe_sum
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    out = out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
    lse = jnp.where(visible, row_max + jnp.log(safe_sum), -jnp.inf)
    lse = lse[..., 0].reshape(batch, q_heads, q_len)
    return out, lse


def merge_attention_partials(out_a, lse_a, out_b, lse_b):
    """Exact merge of attention over two disjoint key sets.

    ``out_*`` are ``[batch, q_len, q_heads, head_dim]``, ``lse_*`` are
    ``[batch, q_heads, q_len]``. A partial whose row has ``lse = -inf`` (no
    visible key) contributes nothing; if both are empty the row stays 0/-inf.
    Differentiable, and NaN-free even for empty rows.
    """
    lse_a = lse_a.astype(jnp.float32)
    lse_b = lse_b.astype(jnp.float32)
    # The shift cancels mathematically; stopping its gradient avoids max's
    # subgradient and -inf arithmetic in the backward pass.
    shift = jnp.maximum(lse_a, lse_b)
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    total = jnp.exp(lse_a - shift) + jnp.exp(lse_b - shift)
    nonempty = total > 0
    lse = jnp.where(nonempty, shift + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
    safe_lse = jnp.where(nonempty, lse, 0.0)
    weight_a = jnp.transpose(jnp.exp(lse_a - safe_lse), (0, 2, 1))[..., None]
    weight_b = jnp.transpose(jnp.exp(lse_b - safe_lse), (0, 2, 1))[..., None]
    out = weight_a * out_a.astype(jnp.float32) + weight_b * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), lse


# --------------------------------------------------------------------------
# Pallas kernels
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static facts the kernels close over (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    q_len: int  # unpadded lengths; padded rows/columns are masked or discarded
    kv_len: int
    group: int  # q heads per kv head
    has_segments: bool
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    interpret: bool


def _matmul_nt(a, b):  # a @ b.T, fp32 accumulation
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_nn(a, b):  # a @ b
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_tn(a, b):  # a.T @ b
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _cdiv_nonneg(x, d):
    """Ceil division of a traced int32 clamped at zero (lax.div truncates)."""
    return lax.div(jnp.maximum(x, 0) + (d - 1), d)


def _floordiv_nonneg(x, d):
    return lax.div(jnp.maximum(x, 0), d)


def _visibility(q_rows, kv_cols, shift, cfg, q_seg, kv_seg, check_kv_len):
    """Mask for one [rows, cols] tile, or None when everything is visible."""
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if cfg.causal:
        mask = both(mask, kv_cols[None, :] <= q_rows[:, None] + shift)
    if check_kv_len:
        mask = both(mask, kv_cols[None, :] < cfg.kv_len)
    if q_seg is not None:
        mask = both(mask, q_seg[:, None] == kv_seg[None, :])
    return mask


def _kv_block_range(q_start, block_q, block_k, shift, cfg):
    """kv blocks a q block must visit: [0, kv_end), of which [0, full_end) need no mask."""
    # Blocks past the real keys hold only padding; the first one that holds any
    # padding needs the length mask.
    kv_end = pl.cdiv(cfg.kv_len, block_k)
    full_end = cfg.kv_len // block_k
    if cfg.causal:
        # The block's last row sees kv index <= q_start + block_q - 1 + shift.
        kv_end = jnp.minimum(_cdiv_nonneg(q_start + block_q + shift, block_k), kv_end)
        # Blocks wholly at or below the first row's horizon need no mask.
        full_end = jnp.minimum(_floordiv_nonneg(q_start + shift + 1, block_k), full_end)
        full_end = jnp.minimum(full_end, kv_end)
    if cfg.has_segments:
        full_end = 0
    if cfg.q_len % block_q:
        # A q block of pure padding (possible when the lengths were padded for a
        # larger backward block) skips the work; its rows are discarded anyway.
        kv_end = jnp.where(q_start >= cfg.q_len, 0, kv_end)
        full_end = jnp.minimum(full_end, kv_end)
    return kv_end, full_end


def _forward_kernel(*refs, cfg: _KernelConfig, num_q_blocks: int, padded_kv_len: int):
    if cfg.has_segments:
        shift_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref = refs
    else:
        shift_ref, q_ref, k_ref, v_ref, out_ref, lse_ref = refs
        q_seg_ref = kv_seg_ref = None
    block_q, block_k = cfg.block_q, cfg.block_k
    kv_padded = padded_kv_len != cfg.kv_len

    # Launch the heaviest causal rows first: shorter tail when the grid drains.
    q_block = num_q_blocks - 1 - pl.program_id(0)
    q_start = q_block * block_q
    shift = shift_ref[0]
    q = q_ref[...]
    q_rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale_log2 = cfg.sm_scale * _LOG2_E  # scores in base 2: exp2 is the fast path

    def step(kv_block, carry, apply_mask):
        acc, row_max, row_sum = carry
        kv_start = pl.multiple_of(kv_block * block_k, block_k)
        k = k_ref[pl.ds(kv_start, block_k), :]
        v = v_ref[pl.ds(kv_start, block_k), :]
        scores = _matmul_nt(q, k) * scale_log2
        if apply_mask:
            kv_cols = kv_start + jnp.arange(block_k, dtype=jnp.int32)
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(kv_start, block_k)]
            mask = _visibility(q_rows, kv_cols, shift, cfg, q_seg, kv_seg, kv_padded)
            scores = jnp.where(mask, scores, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        # A row with nothing visible yet keeps max -inf; shift it by 0 instead
        # (unmasked blocks always raise the max to a finite value).
        new_max_safe = jnp.where(new_max == -jnp.inf, 0.0, new_max) if apply_mask else new_max
        rescale = jnp.exp2(row_max - new_max_safe)
        probs = jnp.exp2(scores - new_max_safe[:, None])
        row_sum = row_sum * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _matmul_nn(probs.astype(v.dtype), v)
        return acc, new_max, row_sum

    kv_end, full_end = _kv_block_range(q_start, block_q, block_k, shift, cfg)

    carry = (
        jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(0, full_end, functools.partial(step, apply_mask=False), carry)
    carry = lax.fori_loop(full_end, kv_end, functools.partial(step, apply_mask=True), carry)
    acc, row_max, row_sum = carry

    visible = row_sum > 0
    out = acc / jnp.where(visible, row_sum, 1.0)[:, None]
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = jnp.where(visible, (row_max + jnp.log2(row_sum)) * _LN_2, -jnp.inf)


def _dq_kernel(*refs, cfg: _KernelConfig, num_q_blocks: int, padded_kv_len: int):
    if cfg.has_segments:
        (shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref) = refs
    else:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg_ref = kv_seg_ref = None
    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    kv_padded = padded_kv_len != cfg.kv_len

    q_block = num_q_blocks - 1 - pl.program_id(0)
    q_start = q_block * block_q
    shift = shift_ref[0]
    q = q_ref[...]
    d_out = do_ref[...]
    lse_log2 = lse_ref[...]  # base-2, fully-masked rows already replaced by 0
    delta = delta_ref[...]
    q_rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale_log2 = cfg.sm_scale * _LOG2_E

    def step(kv_block, dq, apply_mask):
        kv_start = pl.multiple_of(kv_block * block_k, block_k)
        k = k_ref[pl.ds(kv_start, block_k), :]
        v = v_ref[pl.ds(kv_start, block_k), :]
        scores = _matmul_nt(q, k) * scale_log2
        if apply_mask:
            kv_cols = kv_start + jnp.arange(block_k, dtype=jnp.int32)
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(kv_start, block_k)]
            mask = _visibility(q_rows, kv_cols, shift, cfg, q_seg, kv_seg, kv_padded)
            scores = jnp.where(mask, scores, -jnp.inf)
        probs = jnp.exp2(scores - lse_log2[:, None])
        d_probs = _matmul_nt(d_out, v)
        d_scores = probs * (d_probs - delta[:, None])
        return dq + _matmul_nn(d_scores.astype(k.dtype), k)

    kv_end, full_end = _kv_block_range(q_start, block_q, block_k, shift, cfg)

    dq = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
    dq = lax.fori_loop(0, full_end, functools.partial(step, apply_mask=False), dq)
    dq = lax.fori_loop(full_end, kv_end, functools.partial(step, apply_mask=True), dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _KernelConfig, padded_kv_len: int):
    if cfg.has_segments:
        (
            shift_ref,
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            q_seg_ref,
            kv_seg_ref,
            dk_ref,
            dv_ref,
        ) = refs
    else:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        q_seg_ref = kv_seg_ref = None
    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    kv_padded = padded_kv_len != cfg.kv_len

    kv_block = pl.program_id(0)  # low kv blocks carry the most causal work: first
    kv_start = kv_block * block_k
    shift = shift_ref[0]
    k = k_ref[...]
    v = v_ref[...]
    kv_cols = kv_start + jnp.arange(block_k, dtype=jnp.int32)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    scale_log2 = cfg.sm_scale * _LOG2_E

    def step(q_block, carry, head, apply_mask):
        dk, dv = carry
        q_start = pl.multiple_of(q_block * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q = q_ref[rows, head, :]
        d_out = do_ref[rows, head, :]
        lse_log2 = lse_ref[head, rows]
        delta = delta_ref[head, rows]
        scores = _matmul_nt(q, k) * scale_log2
        if apply_mask:
            q_rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            mask = _visibility(q_rows, kv_cols, shift, cfg, q_seg, kv_seg, kv_padded)
            scores = jnp.where(mask, scores, -jnp.inf)
        probs = jnp.exp2(scores - lse_log2[:, None])
        dv = dv + _matmul_tn(probs.astype(d_out.dtype), d_out)
        d_probs = _matmul_nt(d_out, v)
        d_scores = probs * (d_probs - delta[:, None])
        dk = dk + _matmul_tn(d_scores.astype(q.dtype), q)
        return dk, dv

    # Padding rows of q carry no gradient (their dO and lse cotangent are 0).
    num_q_blocks = pl.cdiv(cfg.q_len, block_q)
    if cfg.causal:
        # Row i sees this block's first column iff i >= kv_start - shift, and all
        # of its columns iff i >= kv_start + block_k - 1 - shift.
        q_begin = jnp.minimum(_floordiv_nonneg(kv_start - shift, block_q), num_q_blocks)
        full_begin = jnp.minimum(_cdiv_nonneg(kv_start + block_k - 1 - shift, block_q), num_q_blocks)
    else:
        q_begin = 0
        full_begin = 0
    if cfg.has_segments:
        full_begin = num_q_blocks
    elif kv_padded:
        # Blocks holding padding columns are masked throughout.
        full_begin = jnp.where(kv_block >= cfg.kv_len // block_k, num_q_blocks, full_begin)
    if kv_padded:
        # Blocks of pure padding do no work at all (their dk, dv stay 0).
        q_begin = jnp.where(kv_start >= cfg.kv_len, num_q_blocks, q_begin)

    def per_head(head, carry):  # head indexes the query heads of this kv head's group
        carry = lax.fori_loop(q_begin, full_begin, functools.partial(step, head=head, apply_mask=True), carry)
        return lax.fori_loop(
            full_begin, num_q_blocks, functools.partial(step, head=head, apply_mask=False), carry
        )

    head_dim = k_ref.shape[-1]
    carry = (jnp.zeros((block_k, head_dim), jnp.float32), jnp.zeros((block_k, head_dim), jnp.float32))
    dk, dv = lax.fori_loop(0, cfg.group, per_head, carry)
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward_call(cfg: _KernelConfig, q, k, v, shift, q_seg, kv_seg):
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len = k.shape[1]
    num_q_blocks = padded_q_len // cfg.block_q
    group = cfg.group
    last = num_q_blocks - 1

    in_specs = [
        pl.BlockSpec((1,), lambda i, b, h: (0,)),
        pl.BlockSpec((None, cfg.block_q, None, head_dim), lambda i, b, h: (b, last - i, h, 0)),
        pl.BlockSpec((None, padded_kv_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0)),
        pl.BlockSpec((None, padded_kv_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0)),
    ]
    args = [shift, q, k, v]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, cfg.block_q), lambda i, b, h: (b, last - i)),
            pl.BlockSpec((None, padded_kv_len), lambda i, b, h: (b, 0)),
        ]
        args += [q_seg, kv_seg]
    out_specs = [
        pl.BlockSpec((None, cfg.block_q, None, head_dim), lambda i, b, h: (b, last - i, h, 0)),
        pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, last - i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32),
    ]
    kernel = functools.partial(
        _forward_kernel, cfg=cfg, num_q_blocks=num_q_blocks, padded_kv_len=padded_kv_len
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, q_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_forward",
    )(*args)
    return out, lse


def _backward_call(cfg: _KernelConfig, q, k, v, shift, q_seg, kv_seg, d_out, lse_log2, delta):
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len, kv_heads = k.shape[1], k.shape[2]
    group = cfg.group
    seg_args = [q_seg, kv_seg] if cfg.has_segments else []
    params = compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd)

    # dq: one program per (q block, batch, q head), sweeping kv blocks.
    num_q_blocks = padded_q_len // cfg.block_q_dq
    last = num_q_blocks - 1
    q_tile = pl.BlockSpec((None, cfg.block_q_dq, None, head_dim), lambda i, b, h: (b, last - i, h, 0))
    kv_whole = pl.BlockSpec(
        (None, padded_kv_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0)
    )
    row_tile = pl.BlockSpec((None, None, cfg.block_q_dq), lambda i, b, h: (b, h, last - i))
    in_specs = [
        pl.BlockSpec((1,), lambda i, b, h: (0,)),
        q_tile,
        kv_whole,
        kv_whole,
        q_tile,
        row_tile,
        row_tile,
    ]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, cfg.block_q_dq), lambda i, b, h: (b, last - i)),
            pl.BlockSpec((None, padded_kv_len), lambda i, b, h: (b, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_q_blocks=num_q_blocks, padded_kv_len=padded_kv_len),
        grid=(num_q_blocks, batch, q_heads),
        in_specs=in_specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(shift, q, k, v, d_out, lse_log2, delta, *seg_args)

    # dk, dv: one program per (kv block, batch, kv head), sweeping the group's
    # query heads and q blocks, so GQA needs neither repeated K/V nor atomics.
    num_kv_blocks = padded_kv_len // cfg.block_k_dkv
    q_group = pl.BlockSpec((None, padded_q_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_tile = pl.BlockSpec((None, cfg.block_k_dkv, None, head_dim), lambda j, b, h: (b, j, h, 0))
    row_group = pl.BlockSpec((None, group, padded_q_len), lambda j, b, h: (b, h, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda j, b, h: (0,)),
        q_group,
        kv_tile,
        kv_tile,
        q_group,
        row_group,
        row_group,
    ]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, padded_q_len), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, cfg.block_k_dkv), lambda j, b, h: (b, j)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, padded_kv_len=padded_kv_len),
        grid=(num_kv_blocks, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(shift, q, k, v, d_out, lse_log2, delta, *seg_args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_padded(cfg, q, k, v, shift, q_seg, kv_seg):
    return _forward_call(cfg, q, k, v, shift, q_seg, kv_seg)


def _flash_padded_fwd(cfg, q, k, v, shift, q_seg, kv_seg):
    out, lse = _forward_call(cfg, q, k, v, shift, q_seg, kv_seg)
    return (out, lse), (q, k, v, shift, q_seg, kv_seg, out, lse)


def _flash_padded_bwd(cfg, residuals, cotangents):
    q, k, v, shift, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    # d lse_i / d s_ij = p_ij, so the lse cotangent joins the row term of
    # dS = P * (dP - delta): delta_i = rowsum(dO * O)_i - dlse_i.
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    # Fully-masked rows (lse = -inf) only meet -inf scores: any finite stand-in
    # gives p = 0 there without inf - inf.
    lse_log2 = jnp.where(jnp.isfinite(lse), lse * _LOG2_E, 0.0)
    dq, dk, dv = _backward_call(cfg, q, k, v, shift, q_seg, kv_seg, d_out.astype(q.dtype), lse_log2, delta)
    return dq, dk, dv, None, None, None


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd)


def _fit_block(block: int, length: int) -> int:
    if block < _MIN_BLOCK or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= {_MIN_BLOCK}, got {block}")
    return max(_MIN_BLOCK, min(block, next_pow2(length)))


def default_block_sizes(head_dim: int):
    """Kernel options used where the caller passes None.

    Chosen on an H200 (benchmarks/RESULTS.md): 64x64 forward blocks with 4 warps for head_dim
    <= 64, 128x64 with 8 warps above; 64x64 backward blocks with 4 warps beat (32, 64), (32, 128)
    and (128, 128) at every measured shape.
    """
    big = head_dim > 64
    return dict(
        block_q=128 if big else 64,
        block_k=64,
        backward_block_sizes=(64, 64, 64, 64),
        num_warps=8 if big else 4,
        num_stages=3,
        num_warps_bwd=4,
        num_stages_bwd=2,
    )


def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sm_scale",
        "block_q",
        "block_k",
        "backward_block_sizes",
        "num_warps",
        "num_stages",
        "num_warps_bwd",
        "num_stages_bwd",
        "interpret",
    ),
)
def flash_attention_pallas(
    q,
    k,
    v,
    *,
    causal=True,
    sm_scale=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=0,
    kv_offset=0,
    block_q=None,
    block_k=None,
    backward_block_sizes=None,
    num_warps=None,
    num_stages=None,
    num_warps_bwd=None,
    num_stages_bwd=None,
    interpret=False,
):
    """Pallas flash attention (Triton lowering on GPU). Returns ``(out, lse)``.

    Differentiable in q, k, v through a custom VJP whose backward kernels
    recompute probabilities from ``lse``; the cotangents of both ``out`` and
    ``lse`` are honoured. Block sizes are powers of two >= 16, clipped to the
    sequence; lengths that do not divide them are padded and masked.
    ``backward_block_sizes`` is ``(block_q_dkv, block_k_dkv, block_q_dq,
    block_k_dq)``. ``None`` anywhere takes ``default_block_sizes(head_dim)``.
    """
    _check_shapes(q, k, v)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = _default_scale(head_dim, sm_scale)
    q_seg, kv_seg = _resolve_segment_ids(q_segment_ids, kv_segment_ids, q_len, kv_len)
    defaults = default_block_sizes(head_dim)
    pick = lambda value, name: defaults[name] if value is None else value
    bq_dkv, bk_dkv, bq_dq, bk_dq = pick(backward_block_sizes, "backward_block_sizes")
    cfg = _KernelConfig(
        causal=bool(causal),
        sm_scale=scale,
        q_len=q_len,
        kv_len=kv_len,
        group=q_heads // kv_heads,
        has_segments=q_seg is not None,
        block_q=_fit_block(pick(block_q, "block_q"), q_len),
        block_k=_fit_block(pick(block_k, "block_k"), kv_len),
        block_q_dkv=_fit_block(bq_dkv, q_len),
        block_k_dkv=_fit_block(bk_dkv, kv_len),
        block_q_dq=_fit_block(bq_dq, q_len),
        block_k_dq=_fit_block(bk_dq, kv_len),
        num_warps=pick(num_warps, "num_warps"),
        num_stages=pick(num_stages, "num_stages"),
        num_warps_bwd=pick(num_warps_bwd, "num_warps_bwd"),
        num_stages_bwd=pick(num_stages_bwd, "num_stages_bwd"),
        interpret=bool(interpret),
    )
    # Power-of-two blocks: the largest one is a multiple of all the others.
    q_pad = pl.cdiv(q_len, max(cfg.block_q, cfg.block_q_dkv, cfg.block_q_dq))
    q_pad *= max(cfg.block_q, cfg.block_q_dkv, cfg.block_q_dq)
    kv_pad = pl.cdiv(kv_len, max(cfg.block_k, cfg.block_k_dkv, cfg.block_k_dq))
    kv_pad *= max(cfg.block_k, cfg.block_k_dkv, cfg.block_k_dq)
    # Triton tiles need a power-of-two head dim >= 16; zero columns change
    # neither scores nor the kept output columns.
    dim_pad = max(_MIN_BLOCK, next_pow2(head_dim))

    qp = _pad_axis(_pad_axis(q, 1, q_pad), 3, dim_pad)
    kp = _pad_axis(_pad_axis(k, 1, kv_pad), 3, dim_pad)
    vp = _pad_axis(_pad_axis(v, 1, kv_pad), 3, dim_pad)
    if q_seg is not None:
        q_seg = _pad_axis(q_seg, 1, q_pad)
        kv_seg = _pad_axis(kv_seg, 1, kv_pad)
    shift = (jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32)).reshape(1)
    out, lse = _flash_padded(cfg, qp, kp, vp, shift, q_seg, kv_seg)
    return out[:, :q_len, :, :head_dim], lse[:, :, :q_len]


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def _is_static_zero_shift(q_offset, kv_offset) -> bool:
    static = lambda x: isinstance(x, (int, np.integer))
    return static(q_offset) and static(kv_offset) and int(q_offset) == int(kv_offset)


def _cudnn_eligible(q, k, *, causal, has_segments, need_lse, zero_shift) -> bool:
    head_dim = q.shape[-1]
    return (
        jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and not has_segments
        and not need_lse
        and zero_shift
        and (not causal or q.shape[1] == k.shape[1])
    )


def choose_implementation(
    q, k, *, causal=True, has_segments=False, need_lse=False, q_offset=0, kv_offset=0, platform=None
) -> str:
    """The implementation ``implementation=None`` resolves to.

    CPU: the reference (Pallas on CPU is interpret-only, i.e. slow).
    GPU: cuDNN flash attention when it applies (bf16/fp16, head_dim <= 128 and a
    multiple of 8, no segment ids, no lse wanted, no offset between q and k, and
    square when causal) -- it is the fastest measured JAX path on H100/H200;
    otherwise the Pallas kernel. TPU: the Mosaic TPU kernel (``flash_attention_tpu``;
    compiled by libtpu for v4/v5e/v5p/v6e in ``benchmarks/tpu_compile_check.py``, not yet
    timed on a chip), since the alternative materialises every score matrix.
    Elsewhere: the reference.
    """
    platform = platform or jax.default_backend()
    if platform == "gpu":
        zero_shift = _is_static_zero_shift(q_offset, kv_offset)
        if _cudnn_eligible(
            q, k, causal=causal, has_segments=has_segments, need_lse=need_lse, zero_shift=zero_shift
        ):
            return "cudnn"
        return "pallas"
    if platform == "tpu":
        return "pallas_tpu"
    return "reference"


def _dot_product_attention(q, k, v, *, causal, sm_scale, implementation):
    scale = _default_scale(q.shape[-1], sm_scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=implementation)


def flash_attention_with_lse(
    q,
    k,
    v,
    *,
    causal=True,
    sm_scale=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=0,
    kv_offset=0,
    implementation=None,
    **pallas_options,
):
    """Attention returning ``(out, lse)``; see ``flash_attention`` for dispatch.

    Only implementations that produce lse apply: reference, pallas,
    pallas_interpret, pallas_tpu, pallas_tpu_interpret (auto: reference on CPU,
    pallas on GPU, pallas_tpu on TPU).
    """
    if implementation is None:
        implementation = choose_implementation(
            q,
            k,
            causal=causal,
            has_segments=q_segment_ids is not None,
            need_lse=True,
            q_offset=q_offset,
            kv_offset=kv_offset,
        )
    common = dict(
        causal=causal,
        sm_scale=sm_scale,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    if implementation == "reference":
        return flash_attention_reference(q, k, v, **common)
    if implementation in ("pallas", "pallas_interpret"):
        return flash_attention_pallas(
            q, k, v, **common, **pallas_options, interpret=implementation == "pallas_interpret"
        )
    if implementation in ("pallas_tpu", "pallas_tpu_interpret"):
        # Imported here: the TPU module builds on this one's reference.
        from pallas_kernels.flash_attention_tpu import flash_attention_tpu

        return flash_attention_tpu(
            q, k, v, **common, **pallas_options, interpret=implementation == "pallas_tpu_interpret"
        )
    raise ValueError(
        f"implementation {implementation!r} does not return lse; use reference, pallas(_tpu) or "
        "pallas(_tpu)_interpret"
    )


def flash_attention(
    q,
    k,
    v,
    *,
    causal=True,
    sm_scale=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=0,
    kv_offset=0,
    implementation=None,
    **pallas_options,
):
    """Attention output ``[batch, q_len, q_heads, head_dim]``, dispatched.

    ``implementation``: None (auto, see ``choose_implementation``), "reference",
    "pallas", "pallas_interpret", "pallas_tpu" / "pallas_tpu_interpret" (the
    Mosaic TPU kernel; ``pallas_options`` are its block_q and
    block_k), "cudnn" or "xla" (the last two go through
    ``jax.nn.dot_product_attention`` and support neither segment ids nor
    offsets). When auto picks cuDNN and cuDNN rejects the call at trace time
    (old cuDNN, unsupported GPU), the Pallas kernel is used instead.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    auto = implementation is None
    if auto:
        implementation = choose_implementation(
            q,
            k,
            causal=causal,
            has_segments=q_segment_ids is not None,
            need_lse=False,
            q_offset=q_offset,
            kv_offset=kv_offset,
        )
    if implementation in ("cudnn", "xla"):
        if q_segment_ids is not None or kv_segment_ids is not None:
            raise ValueError(f"implementation {implementation!r} does not take segment ids")
        if not _is_static_zero_shift(q_offset, kv_offset):
            raise ValueError(f"implementation {implementation!r} needs q_offset == kv_offset (static)")
        try:
            return _dot_product_attention(
                q, k, v, causal=causal, sm_scale=sm_scale, implementation=implementation
            )
        except (NotImplementedError, ValueError, RuntimeError):
            if not auto:
                raise
            implementation = "pallas"
    out, _ = flash_attention_with_lse(
        q,
        k,
        v,
        causal=causal,
        sm_scale=sm_scale,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
        kv_offset=kv_offset,
        implementation=implementation,
        **pallas_options,
    )
    return out
