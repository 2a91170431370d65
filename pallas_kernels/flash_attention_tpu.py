"""Flash attention forward as a Pallas kernel for the Mosaic TPU lowering.

Same semantics as ``flash_attention.flash_attention_reference`` (layouts,
causal offsets, segment ids, GQA without repeated K/V, fp32 ``lse`` with
``-inf`` and a zero output for rows that see no key).

Kernel layout. The wrapper moves heads in front of the sequence so each block
is a ``[rows, head_dim]`` tile whose last two dims suit the TPU's (8, 128)
vector layout. The grid is ``(batch, q_heads, q_blocks, kv_blocks)``; the K/V
index maps pick kv head ``h // group``, so grouped query heads share one K/V
copy in HBM. The kv axis is last and "arbitrary": the running max ``m``, the
running sum ``l`` and the fp32 output accumulator live in VMEM scratch across
it, and the output block is written once, at the last kv step. The other axes
are "parallel" (free to split across TensorCores).

The causal shift ``q_offset - kv_offset`` travels as a scalar-prefetch
operand, so a traced offset (one ring-attention step) is one call, not a
recompile. Causal kv blocks wholly above the diagonal skip their compute, and
their index maps repeat the last useful block so the pipeline fetches nothing
new for them. Lengths that do not divide the blocks are padded and the padded
keys masked.

Gradients: ``jax.custom_vjp`` whose backward recomputes attention through the
dense jnp reference (``jax.vjp`` of ``flash_attention_reference``). It is
exact but materialises the ``[q_len, kv_len]`` scores per head -- there is no
Pallas TPU backward kernel yet.
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

from pallas_kernels.flash_attention import (
    _check_shapes,
    _resolve_segment_ids,
    flash_attention_reference,
)

# m and l are kept replicated across one vreg's 128 lanes: a [rows, 1] array
# would occupy a whole vreg column per row anyway, and full-width tiles avoid
# Mosaic's narrow-layout relayouts.
_LANES = 128
_DEFAULT_BLOCK = 128
# Block rows must be whole sublane tiles (8 rows of 32-bit values).
_SUBLANES = 8

# A squeezed block dim is ``pl.squeezed`` on newer jax and ``None`` on older.
_SQUEEZED = getattr(pl, "squeezed", None)
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def _interpret_params():
    """TPU interpreter settings that make forgotten writes and bad reads loud.

    Uninitialised buffers (scratch included) start as NaN and out-of-bounds
    reads raise. Options this jax lacks are left out.
    """
    wanted = {"uninitialized_memory": "nan", "out_of_bounds_reads": "raise"}
    fields = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
    return pltpu.InterpretParams(**{k: v for k, v in wanted.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static facts the kernel closes over (hashable: a custom_vjp nondiff arg)."""

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


def _forward_kernel(*refs, cfg: _Config):
    if cfg.has_segments:
        (
            shift_ref,
            q_ref,
            k_ref,
            v_ref,
            q_seg_ref,
            kv_seg_ref,
            out_ref,
            lse_ref,
            m_ref,
            l_ref,
            acc_ref,
        ) = refs
    else:
        shift_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    q_block, kv_block = pl.program_id(2), pl.program_id(3)
    shift = shift_ref[0]

    @pl.when(kv_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def _accumulate():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        scores = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        scores = scores * cfg.sm_scale
        shape = scores.shape
        mask = None
        cols = kv_block * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        if cfg.causal:
            rows = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
            mask = cols <= rows + shift
        if cfg.padded_kv_len != cfg.kv_len:
            in_range = cols < cfg.kv_len
            mask = in_range if mask is None else mask & in_range
        if cfg.has_segments:
            same_segment = (
                q_seg_ref[...] == kv_seg_ref[...]
            )  # [block_q, 1] vs [1, block_k]
            mask = same_segment if mask is None else mask & same_segment
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)

        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        # A row with no visible key so far keeps m = -inf; shifting it by 0
        # instead gives exp(-inf) = 0 rather than exp(-inf + inf) = NaN.
        m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        probs = jnp.exp(scores - m_shift[:, :1])
        rescale = jnp.exp(m_prev - m_shift)
        l_ref[...] = rescale * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = lax.dot_general(
            probs.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        acc_ref[...] = rescale[:, :1] * acc_ref[...] + pv

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


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def _forward(q, k, v, q_seg, kv_seg, shift, cfg: _Config):
    """Head-major padded inputs -> (out [b, h, q_pad, d], lse [b, h, q_pad, 1])."""
    batch, q_heads, padded_q_len, head_dim = q.shape
    grid = (
        batch,
        q_heads,
        padded_q_len // cfg.block_q,
        cfg.padded_kv_len // cfg.block_k,
    )
    S = _SQUEEZED

    def q_map(b, h, i, j, shift_ref):
        return b, h, i, 0

    def kv_map(b, h, i, j, shift_ref):
        if cfg.causal:
            # Past the diagonal, re-name the last useful block: no new DMA.
            j = jnp.minimum(j, _last_visible_kv_block(i, shift_ref[0], cfg))
        return b, h // cfg.group, j, 0

    in_specs = [
        pl.BlockSpec((S, S, cfg.block_q, head_dim), q_map),
        pl.BlockSpec((S, S, cfg.block_k, head_dim), kv_map),
        pl.BlockSpec((S, S, cfg.block_k, head_dim), kv_map),
    ]
    operands = [q, k, v]
    if cfg.has_segments:
        # q ids as a column [block_q, 1], kv ids as a row [1, block_k]: their
        # comparison broadcasts to the score tile without any transpose.
        in_specs += [
            pl.BlockSpec((S, cfg.block_q, 1), lambda b, h, i, j, s: (b, i, 0)),
            pl.BlockSpec(
                (S, 1, cfg.block_k),
                lambda b, h, i, j, s: (b, 0, kv_map(b, h, i, j, s)[2]),
            ),
        ]
        operands += [q_seg[:, :, None], kv_seg[:, None, :]]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((S, S, cfg.block_q, head_dim), q_map),
            pl.BlockSpec((S, S, cfg.block_q, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((cfg.block_q, _LANES), jnp.float32),  # running max m
            pltpu.VMEM((cfg.block_q, _LANES), jnp.float32),  # running sum l
            pltpu.VMEM((cfg.block_q, head_dim), jnp.float32),  # output accumulator
        ],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, q_heads, padded_q_len, 1), jnp.float32),
        ],
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_params() if cfg.interpret else False,
    )(jnp.reshape(shift, (1,)), *operands)


def _pad_axis(x, axis, length):
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, kv_seg, shift, cfg: _Config):
    """Model layout in, model layout out; pads and transposes around the kernel."""
    q_len = q.shape[1]
    padded_q_len = _round_up(q_len, cfg.block_q)
    q_t = _pad_axis(jnp.swapaxes(q, 1, 2), 2, padded_q_len)
    k_t = _pad_axis(jnp.swapaxes(k, 1, 2), 2, cfg.padded_kv_len)
    v_t = _pad_axis(jnp.swapaxes(v, 1, 2), 2, cfg.padded_kv_len)
    if cfg.has_segments:
        q_seg = _pad_axis(q_seg, 1, padded_q_len)
        kv_seg = _pad_axis(kv_seg, 1, cfg.padded_kv_len)
    out, lse = _forward(q_t, k_t, v_t, q_seg, kv_seg, shift, cfg)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2), lse[:, :, :q_len, 0]


def _attention_fwd(q, k, v, q_seg, kv_seg, shift, cfg):
    return _attention(q, k, v, q_seg, kv_seg, shift, cfg), (
        q,
        k,
        v,
        q_seg,
        kv_seg,
        shift,
    )


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, shift = residuals

    def reference(q, k, v):
        # The mask depends only on q_offset - kv_offset, so the shift suffices.
        return flash_attention_reference(
            q,
            k,
            v,
            causal=cfg.causal,
            sm_scale=cfg.sm_scale,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            q_offset=shift,
            kv_offset=0,
        )

    _, vjp = jax.vjp(reference, q, k, v)
    dq, dk, dv = vjp(cotangents)
    return dq, dk, dv, None, None, None


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
    """Flash attention ``(out, lse)`` through the Mosaic TPU Pallas kernel.

    ``interpret=True`` runs the same kernel in the TPU interpreter on any
    backend (slow; for tests). ``block_q``/``block_k`` default to 128 or the
    whole (8-rounded) length when shorter; explicit sizes must be multiples of
    8, and on a real TPU ``block_k`` should be a multiple of 128 (it is the
    lane dim of the score tile) unless it covers the whole padded key length.
    """
    _check_shapes(q, k, v)
    q_len, q_heads, head_dim = q.shape[1:]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    q_seg, kv_seg = _resolve_segment_ids(q_segment_ids, kv_segment_ids, q_len, kv_len)
    block_q = block_q or min(_DEFAULT_BLOCK, _round_up(q_len, _SUBLANES))
    block_k = block_k or min(_DEFAULT_BLOCK, _round_up(kv_len, _SUBLANES))
    if block_q % _SUBLANES or block_k % _SUBLANES:
        raise ValueError(
            f"block_q={block_q} and block_k={block_k} must be multiples of {_SUBLANES}"
        )
    cfg = _Config(
        causal=bool(causal),
        sm_scale=1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale),
        kv_len=kv_len,
        padded_kv_len=_round_up(kv_len, block_k),
        group=q_heads // kv_heads,
        has_segments=q_seg is not None,
        block_q=block_q,
        block_k=block_k,
        interpret=bool(interpret),
    )
    shift = jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32)
    return _attention(q, k, v, q_seg, kv_seg, shift, cfg)
