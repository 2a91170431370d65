"""Flash attention forward and backward as Pallas kernels for the Mosaic TPU lowering.

Same semantics as ``flash_attention.flash_attention_reference`` (layouts,
causal offsets, segment ids, GQA without repeated K/V, fp32 ``lse`` with
``-inf`` and a zero output for rows that see no key).

Forward layout. The wrapper moves heads in front of the sequence so each block
is a ``[rows, head_dim]`` tile whose last two dims suit the TPU's (8, 128)
vector layout. The grid is ``(batch, q_heads, q_blocks, kv_blocks)``; the K/V
index maps pick kv head ``h // group``, so grouped query heads share one K/V
copy in HBM. The kv axis is last and "arbitrary": the running max ``m``, the
running sum ``l`` and the fp32 output accumulator live in VMEM scratch across
it, and the output block is written once, at the last kv step. The other axes
are "parallel" (free to split across TensorCores).

Backward (FlashAttention-2). The residuals are the inputs and the forward's
``out`` and ``lse``; ``delta = rowsum(dO * O) - dlse`` is one fp32 XLA
reduction outside the kernels (``d lse_i / d s_ij = p_ij``, so the lse
cotangent folds into the row term of ``dS = P * (dP - delta)``). Two kernels
recompute ``P = exp(S - lse)`` blockwise instead of storing it:

- dQ: grid ``(batch, q_heads, q_blocks, kv_blocks)``, the forward's shape, with
  an fp32 dQ accumulator in VMEM across the "arbitrary" kv axis. It reads
  ``lse`` and ``delta`` as the same lane-row arrays as dK/dV and turns them
  into lane-replicated columns once per q block: a ``[q_len, 1]`` HBM array is
  lane-padded 128x. (The forward still writes ``lse`` as such a column: Mosaic
  on v4 cannot relayout a column into a row, "sublane gather".)
- dK/dV: grid ``(batch, kv_heads, kv_blocks, group, q_blocks)``; the kv block
  stays resident while the two trailing "arbitrary" axes sweep every query
  head of its GQA group and every q block, so the group sum happens in the
  fp32 VMEM accumulators -- no per-query-head dK/dV in HBM and no sum after.
  It works on transposed scores ``S^T = K Q^T`` (``[block_k, block_q]``) with
  ``lse`` and ``delta`` as lane rows: then ``dV = P^T dO``, ``dP^T = V dO^T``
  and ``dK = dS^T Q`` are plain or rhs-transposed matmuls, with no in-kernel
  transpose of a score tile.

Both kernels feed the MXU operands in the input dtype (``P`` and ``dS`` cast
to it) and accumulate in fp32.

The causal shift ``q_offset - kv_offset`` travels as a scalar-prefetch
operand, so a traced offset (one ring-attention step) is one call, not a
recompile. Causal blocks wholly above the diagonal skip their compute in all
three kernels, and their index maps re-name the nearest useful block so the
pipeline fetches nothing new for them. Lengths that do not divide the blocks
are padded and the padded keys masked; padded query rows get ``lse = +inf`` in
the backward, so their probabilities are exactly zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic_tpu import (
    LANES,
    SQUEEZED,
    SUBLANES,
    CompilerParams,
    interpret_params,
    out_struct,
    pad_axis,
    round_up,
)
from pallas_kernels.flash_attention import _check_shapes, _resolve_segment_ids

# m and l are kept replicated across one vreg's 128 lanes (LANES): a [rows, 1]
# array would occupy a whole vreg column per row anyway, and full-width tiles
# avoid Mosaic's narrow-layout relayouts. Block rows must be whole sublane tiles.
_DEFAULT_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static facts the kernels close over (hashable: a custom_vjp nondiff arg)."""

    causal: bool
    sm_scale: float
    kv_len: int  # unpadded; keys at or past it are padding
    padded_kv_len: int
    group: int
    has_segments: bool
    block_q: int
    block_k: int
    interpret: bool


def _last_visible_kv_block(q_block, shift, cfg):
    """Index of the last kv block any row of ``q_block`` may see (causal), >= 0."""
    last_row_position = q_block * cfg.block_q + cfg.block_q - 1 + shift
    return lax.div(jnp.maximum(last_row_position, 0), cfg.block_k)


def _first_visible_q_block(kv_block, shift, cfg):
    """Index of the first q block with a row that sees part of ``kv_block`` (causal).

    Row ``r`` sees key ``c`` iff ``c <= r + shift``; the block's first key is
    the easiest to see. May be past the last q block (then no row sees it).
    """
    first_row = kv_block * cfg.block_k - shift
    return lax.div(jnp.maximum(first_row, 0), cfg.block_q)


def _masked_scores(a, b, q_block, kv_block, q_seg_ref, kv_seg_ref, shift, cfg, *, kv_major=False):
    """Scaled scores ``a @ b.T`` of one tile with invisible entries at -inf.

    ``a, b = q, k`` gives ``S`` [block_q, block_k]; ``a, b = k, q`` with
    ``kv_major`` gives ``S^T`` [block_k, block_q]. The segment-id blocks come
    shaped to broadcast against each other (a column against a row) in the
    tile's orientation, so the same mask code serves both.
    """
    scores = _matmul_nt(a, b) * cfg.sm_scale
    q_axis, kv_axis = (1, 0) if kv_major else (0, 1)
    q_pos = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, scores.shape, q_axis)
    kv_pos = kv_block * cfg.block_k + lax.broadcasted_iota(jnp.int32, scores.shape, kv_axis)
    mask = None

    def both(mask, more):
        return more if mask is None else mask & more

    if cfg.causal:
        mask = both(mask, kv_pos <= q_pos + shift)
    if cfg.padded_kv_len != cfg.kv_len:
        mask = both(mask, kv_pos < cfg.kv_len)
    if cfg.has_segments:
        mask = both(mask, q_seg_ref[...] == kv_seg_ref[...])
    return scores if mask is None else jnp.where(mask, scores, -jnp.inf)


def _matmul_nt(a, b):  # a @ b.T on the MXU, fp32 accumulation
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _matmul_nn(a, b):  # a @ b
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def _split_refs(refs, cfg, num_trailing):
    """(shift, inputs, q_seg, kv_seg, the last ``num_trailing`` refs: outputs and scratch).

    The segment refs are None without segments.
    """
    num_inputs = len(refs) - 1 - num_trailing - (2 if cfg.has_segments else 0)
    shift_ref, rest = refs[0], refs[1:]
    inputs, rest = rest[:num_inputs], rest[num_inputs:]
    if cfg.has_segments:
        (q_seg_ref, kv_seg_ref), rest = rest[:2], rest[2:]
    else:
        q_seg_ref = kv_seg_ref = None
    return shift_ref, inputs, q_seg_ref, kv_seg_ref, rest


def _forward_kernel(*refs, cfg: _Config):
    shift_ref, (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, rest = _split_refs(
        refs, cfg, num_trailing=5
    )
    out_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    q_block, kv_block = pl.program_id(2), pl.program_id(3)
    shift = shift_ref[0]

    @pl.when(kv_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def _accumulate():
        v = v_ref[...]
        # Segment ids: [block_q, 1] vs [1, block_k], broadcast without a transpose.
        scores = _masked_scores(q_ref[...], k_ref[...], q_block, kv_block, q_seg_ref, kv_seg_ref,
                                shift, cfg)

        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        # A row with no visible key so far keeps m = -inf; shifting it by 0
        # instead gives exp(-inf) = 0 rather than exp(-inf + inf) = NaN.
        m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        probs = jnp.exp(scores - m_shift[:, :1])
        rescale = jnp.exp(m_prev - m_shift)
        l_ref[...] = rescale * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = rescale[:, :1] * acc_ref[...] + _matmul_nn(
            probs.astype(v.dtype), v
        )

    if cfg.causal:
        pl.when(kv_block <= _last_visible_kv_block(q_block, shift, cfg))(_accumulate)
    else:
        _accumulate()

    @pl.when(kv_block == pl.num_programs(3) - 1)
    def _finalize():
        l = l_ref[...][:, :1]
        visible = l > 0
        safe_l = jnp.where(visible, l, 1.0)
        out_ref[...] = (acc_ref[...] / safe_l).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(visible, m_ref[...][:, :1] + jnp.log(safe_l), -jnp.inf)


def _dq_kernel(*refs, cfg: _Config):
    shift_ref, inputs, q_seg_ref, kv_seg_ref, rest = _split_refs(
        refs, cfg, num_trailing=4
    )
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    dq_ref, acc_ref, lse_column_ref, delta_column_ref = rest
    q_block, kv_block = pl.program_id(2), pl.program_id(3)
    shift = shift_ref[0]

    @pl.when(kv_block == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        # lse and delta arrive as lane rows [1, block_q] (the dK/dV kernel's
        # arrays; a [q_len, 1] HBM array would be lane-padded 128x). Turn them
        # into row-aligned columns once per q block, replicated over the lanes
        # like the forward's m and l.
        for row_ref, column_ref in (
            (lse_ref, lse_column_ref),
            (delta_ref, delta_column_ref),
        ):
            column = row_ref[...].reshape(cfg.block_q, 1)
            column_ref[...] = jnp.broadcast_to(column, column_ref.shape)

    def _accumulate():
        k = k_ref[...]
        scores = _masked_scores(q_ref[...], k, q_block, kv_block, q_seg_ref, kv_seg_ref, shift, cfg)
        probs = jnp.exp(scores - lse_column_ref[...][:, :1])
        d_probs = _matmul_nt(do_ref[...], v_ref[...])
        d_scores = probs * (d_probs - delta_column_ref[...][:, :1])
        acc_ref[...] += _matmul_nn(d_scores.astype(k.dtype), k)

    if cfg.causal:
        pl.when(kv_block <= _last_visible_kv_block(q_block, shift, cfg))(_accumulate)
    else:
        _accumulate()

    @pl.when(kv_block == pl.num_programs(3) - 1)
    def _finalize():
        dq_ref[...] = (acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Config):
    shift_ref, inputs, q_seg_ref, kv_seg_ref, rest = _split_refs(
        refs, cfg, num_trailing=4
    )
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = rest
    kv_block, head_in_group = pl.program_id(2), pl.program_id(3)
    q_block = pl.program_id(4)
    shift = shift_ref[0]

    @pl.when((head_in_group == 0) & (q_block == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def _accumulate():
        q, d_out = q_ref[...], do_ref[...]
        # Transposed scores [block_k, block_q]: kv positions down, q across; segment ids
        # [1, block_q] vs [block_k, 1].
        scores_t = _masked_scores(k_ref[...], q, q_block, kv_block, q_seg_ref, kv_seg_ref, shift,
                                  cfg, kv_major=True)
        probs_t = jnp.exp(scores_t - lse_ref[...])  # lse row [1, block_q]
        dv_acc_ref[...] += _matmul_nn(probs_t.astype(d_out.dtype), d_out)
        d_probs_t = _matmul_nt(v_ref[...], d_out)
        d_scores_t = probs_t * (d_probs_t - delta_ref[...])
        dk_acc_ref[...] += _matmul_nn(d_scores_t.astype(q.dtype), q)

    if cfg.causal:
        pl.when(q_block >= _first_visible_q_block(kv_block, shift, cfg))(_accumulate)
    else:
        _accumulate()

    @pl.when(
        (head_in_group == pl.num_programs(3) - 1) & (q_block == pl.num_programs(4) - 1)
    )
    def _finalize():
        dk_ref[...] = (dk_acc_ref[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _call(kernel, cfg, grid, in_specs, operands, out_specs, out_shape, scratch, shift):
    """A scalar-prefetch (the shift) pallas_call whose first three grid axes are
    "parallel" and whose trailing axes are the "arbitrary" accumulation sweep."""
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=CompilerParams(dimension_semantics=semantics),
        # Pipelined blocks only, no manual DMAs: nothing for the race detector to see.
        interpret=interpret_params(detect_races=False) if cfg.interpret else False,
    )(jnp.reshape(shift, (1,)), *operands)


def _q_major_grid(q, cfg):
    """``(batch, q_heads, q_blocks, kv_blocks)`` for head-major padded ``q``."""
    batch, q_heads, padded_q_len, _ = q.shape
    return batch, q_heads, padded_q_len // cfg.block_q, cfg.padded_kv_len // cfg.block_k


def _q_major_specs(cfg, head_dim):
    """Block specs of the grid ``(batch, q_heads, q_blocks, kv_blocks)`` (forward, dQ).

    Returns (q-tile spec, kv-tile spec, q-column spec for per-row scalars,
    segment specs).
    """
    S = SQUEEZED

    def q_map(b, h, i, j, shift_ref):
        return b, h, i, 0

    def kv_map(b, h, i, j, shift_ref):
        if cfg.causal:
            # Past the diagonal, re-name the last useful block: no new DMA.
            j = jnp.minimum(j, _last_visible_kv_block(i, shift_ref[0], cfg))
        return b, lax.div(h, cfg.group), j, 0

    # q ids as a column [block_q, 1], kv ids as a row [1, block_k]: their
    # comparison broadcasts to the score tile without any transpose.
    segment_specs = [
        pl.BlockSpec((S, cfg.block_q, 1), lambda b, h, i, j, s: (b, i, 0)),
        pl.BlockSpec(
            (S, 1, cfg.block_k), lambda b, h, i, j, s: (b, 0, kv_map(b, h, i, j, s)[2])
        ),
    ]
    return (
        pl.BlockSpec((S, S, cfg.block_q, head_dim), q_map),
        pl.BlockSpec((S, S, cfg.block_k, head_dim), kv_map),
        pl.BlockSpec((S, S, cfg.block_q, 1), q_map),
        segment_specs if cfg.has_segments else [],
    )


def _segment_operands(q_seg, kv_seg, cfg, *, q_as_column):
    if not cfg.has_segments:
        return []
    if q_as_column:
        return [q_seg[:, :, None], kv_seg[:, None, :]]
    return [q_seg[:, None, :], kv_seg[:, :, None]]


def _forward(q, k, v, q_seg, kv_seg, shift, cfg: _Config):
    """Head-major padded inputs -> (out [b, h, q_pad, d], lse [b, h, q_pad, 1])."""
    batch, q_heads, padded_q_len, head_dim = q.shape
    grid = _q_major_grid(q, cfg)
    q_spec, kv_spec, column_spec, segment_specs = _q_major_specs(cfg, head_dim)
    return _call(
        _forward_kernel,
        cfg,
        grid,
        [q_spec, kv_spec, kv_spec, *segment_specs],
        [q, k, v, *_segment_operands(q_seg, kv_seg, cfg, q_as_column=True)],
        [q_spec, column_spec],
        [
            out_struct(q.shape, q.dtype, q),
            out_struct((batch, q_heads, padded_q_len, 1), jnp.float32, q),
        ],
        [
            pltpu.VMEM((cfg.block_q, LANES), jnp.float32),  # running max m
            pltpu.VMEM((cfg.block_q, LANES), jnp.float32),  # running sum l
            pltpu.VMEM((cfg.block_q, head_dim), jnp.float32),  # output accumulator
        ],
        shift,
    )


def _backward_dq(q, k, v, d_out, lse, delta, q_seg, kv_seg, shift, cfg: _Config):
    """Head-major padded operands, lse/delta rows [b, h, 1, q_pad] -> dq [b, h, q_pad, d]."""
    grid = _q_major_grid(q, cfg)
    q_spec, kv_spec, _, segment_specs = _q_major_specs(cfg, q.shape[-1])
    row_spec = pl.BlockSpec(
        (SQUEEZED, SQUEEZED, 1, cfg.block_q), lambda b, h, i, j, s: (b, h, 0, i)
    )
    return _call(
        _dq_kernel,
        cfg,
        grid,
        [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *segment_specs],
        [
            q,
            k,
            v,
            d_out,
            lse,
            delta,
            *_segment_operands(q_seg, kv_seg, cfg, q_as_column=True),
        ],
        q_spec,
        out_struct(q.shape, q.dtype, q),
        [
            pltpu.VMEM((cfg.block_q, q.shape[-1]), jnp.float32),  # dQ accumulator
            pltpu.VMEM((cfg.block_q, LANES), jnp.float32),  # lse as a column
            pltpu.VMEM((cfg.block_q, LANES), jnp.float32),  # delta as a column
        ],
        shift,
    )


def _backward_dkv(q, k, v, d_out, lse, delta, q_seg, kv_seg, shift, cfg: _Config):
    """Head-major padded operands, lse/delta rows [b, h, 1, q_pad] -> (dk, dv) [b, kv_h, kv_pad, d]."""
    batch, _, padded_q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    num_q_blocks = padded_q_len // cfg.block_q
    grid = (batch, kv_heads, cfg.padded_kv_len // cfg.block_k, cfg.group, num_q_blocks)
    S = SQUEEZED

    def q_block_of(j, i, shift_ref):
        if cfg.causal:
            # Before the first q block that sees this kv block, re-name that
            # block (it is fetched once, then used); if none sees it, the last.
            first = _first_visible_q_block(j, shift_ref[0], cfg)
            i = jnp.minimum(jnp.maximum(i, first), num_q_blocks - 1)
        return i

    def q_map(b, h, j, g, i, shift_ref):
        return b, h * cfg.group + g, q_block_of(j, i, shift_ref), 0

    def row_map(b, h, j, g, i, shift_ref):
        return b, h * cfg.group + g, 0, q_block_of(j, i, shift_ref)

    def kv_map(b, h, j, g, i, shift_ref):
        return b, h, j, 0

    q_spec = pl.BlockSpec((S, S, cfg.block_q, head_dim), q_map)
    kv_spec = pl.BlockSpec((S, S, cfg.block_k, head_dim), kv_map)
    # lse and delta as lane rows [1, block_q], matching the transposed scores.
    row_spec = pl.BlockSpec((S, S, 1, cfg.block_q), row_map)
    segment_specs = []
    if cfg.has_segments:
        segment_specs = [
            pl.BlockSpec(
                (S, 1, cfg.block_q),
                lambda b, h, j, g, i, s: (b, 0, q_block_of(j, i, s)),
            ),
            pl.BlockSpec((S, cfg.block_k, 1), lambda b, h, j, g, i, s: (b, j, 0)),
        ]
    return _call(
        _dkv_kernel,
        cfg,
        grid,
        [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *segment_specs],
        [
            q,
            k,
            v,
            d_out,
            lse,
            delta,
            *_segment_operands(q_seg, kv_seg, cfg, q_as_column=False),
        ],
        [kv_spec, kv_spec],
        [
            out_struct(k.shape, k.dtype, k),
            out_struct(v.shape, v.dtype, v),
        ],
        [
            pltpu.VMEM((cfg.block_k, head_dim), jnp.float32),  # dK accumulator
            pltpu.VMEM((cfg.block_k, head_dim), jnp.float32),  # dV accumulator
        ],
        shift,
    )


def _head_major(x, padded_len):
    """[batch, len, heads, d] -> [batch, heads, padded_len, d], zero padded."""
    return pad_axis(jnp.swapaxes(x, 1, 2), 2, padded_len)


def _padded_inputs(q, k, v, q_seg, kv_seg, cfg: _Config):
    padded_q_len = round_up(q.shape[1], cfg.block_q)
    if cfg.has_segments:
        q_seg = pad_axis(q_seg, 1, padded_q_len)
        kv_seg = pad_axis(kv_seg, 1, cfg.padded_kv_len)
    return (
        _head_major(q, padded_q_len),
        _head_major(k, cfg.padded_kv_len),
        _head_major(v, cfg.padded_kv_len),
        q_seg,
        kv_seg,
    )


def _attention_forward(q, k, v, q_seg, kv_seg, shift, cfg: _Config):
    """Model layout in, model layout out; pads and transposes around the kernel."""
    q_len = q.shape[1]
    out, lse = _forward(*_padded_inputs(q, k, v, q_seg, kv_seg, cfg), shift, cfg)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2), lse[:, :, :q_len, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, kv_seg, shift, cfg: _Config):
    return _attention_forward(q, k, v, q_seg, kv_seg, shift, cfg)


def _attention_fwd(q, k, v, q_seg, kv_seg, shift, cfg):
    out, lse = _attention_forward(q, k, v, q_seg, kv_seg, shift, cfg)
    return (out, lse), (q, k, v, q_seg, kv_seg, shift, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, shift, out, lse = residuals
    d_out, d_lse = cotangents
    q_len, kv_len = q.shape[1], k.shape[1]
    padded_q_len = round_up(q_len, cfg.block_q)
    # d lse_i / d s_ij = p_ij, so the lse cotangent joins the row term of
    # dS = P * (dP - delta) as delta_i = rowsum(dO * O)_i - dlse_i. fp32 XLA
    # reduction: one pass over dO and O, cheaper than a third kernel.
    delta = jnp.einsum(
        "bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32)
    ) - d_lse.astype(jnp.float32)
    # Rows that see no key (lse = -inf) and padding rows get lse = +inf: then
    # p = exp(s - lse) is exactly 0 for any score, masked (-inf) or not, so
    # their gradients are 0 without an inf - inf anywhere.
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    # Both kernels read them as lane rows [b, h, 1, q_pad].
    lse = pad_axis(lse, 2, padded_q_len, value=jnp.inf)[:, :, None, :]
    delta = pad_axis(delta, 2, padded_q_len)[:, :, None, :]
    q_t, k_t, v_t, q_seg, kv_seg = _padded_inputs(q, k, v, q_seg, kv_seg, cfg)
    operands = (
        q_t,
        k_t,
        v_t,
        _head_major(d_out.astype(q.dtype), padded_q_len),
        lse,
        delta,
    )
    dq = _backward_dq(*operands, q_seg, kv_seg, shift, cfg)
    dk, dv = _backward_dkv(*operands, q_seg, kv_seg, shift, cfg)
    return (
        jnp.swapaxes(dq[:, :, :q_len], 1, 2),
        jnp.swapaxes(dk[:, :, :kv_len], 1, 2),
        jnp.swapaxes(dv[:, :, :kv_len], 1, 2),
        None,
        None,
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_tpu(
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
    interpret=False,
):
    """Flash attention ``(out, lse)`` through the Mosaic TPU Pallas kernels.

    Differentiable (both outputs) through the Pallas backward kernels.
    ``interpret=True`` runs the same kernels in the TPU interpreter on any
    backend (slow; for tests). ``block_q``/``block_k`` default to 128 or the
    whole (8-rounded) length when shorter; explicit sizes must be multiples of
    8, and on a real TPU both should be multiples of 128 (``block_k`` is the
    lane dim of the forward's score tile, ``block_q`` that of the dK/dV
    kernel's transposed one) unless they cover the whole padded length.
    """
    _check_shapes(q, k, v)
    q_len, q_heads, head_dim = q.shape[1:]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    q_seg, kv_seg = _resolve_segment_ids(q_segment_ids, kv_segment_ids, q_len, kv_len)
    block_q = block_q or min(_DEFAULT_BLOCK, round_up(q_len, SUBLANES))
    block_k = block_k or min(_DEFAULT_BLOCK, round_up(kv_len, SUBLANES))
    if block_q % SUBLANES or block_k % SUBLANES:
        raise ValueError(
            f"block_q={block_q} and block_k={block_k} must be multiples of {SUBLANES}"
        )
    cfg = _Config(
        causal=bool(causal),
        sm_scale=1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale),
        kv_len=kv_len,
        padded_kv_len=round_up(kv_len, block_k),
        group=q_heads // kv_heads,
        has_segments=q_seg is not None,
        block_q=block_q,
        block_k=block_k,
        interpret=bool(interpret),
    )
    shift = jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32)
    return _attention(q, k, v, q_seg, kv_seg, shift, cfg)
