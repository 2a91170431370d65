"""Paged attention over the serving page pool: decode, and ragged chunked prefill + decode.

Cache layout (per layer), as the page pool stores it:
  k_pages, v_pages  [num_pages, page_size, kv_heads, head_dim]
  page_table        [num_seqs, pages_per_seq] int32, the page ids of each sequence in order
  lengths           [num_seqs] int32, tokens stored; token t of sequence s lives at
                    page page_table[s, t // page_size], slot t % page_size.
Entries of `page_table` past a sequence's length may hold anything (even out-of-range ids)
and pages or slots past a length may hold anything (even NaN): every implementation here
substitutes a safe page id before gathering and zeroes V where the token is masked, because
`0 * NaN` would otherwise leak through the probability-weighted sum.

Implementations (`implementation=`):
  "reference"         plain jnp, fp32 everywhere; the ground truth of the tests.
  "xla"               gather the pages, then einsum in the cache dtype with fp32 accumulation.
  "pallas"            Pallas kernels lowered through Triton (GPU).
  "pallas_interpret"  the same kernels run by the Pallas interpreter (any backend; CPU tests).
  "pallas_tpu"        the Mosaic TPU kernels of `paged_attention_tpu.py` (decode) and
                      `ragged_paged_attention_tpu.py` (ragged), whose page ids come from SMEM
                      and address per-page DMAs (the kernels below gather pages with vector
                      indices, which Mosaic TPU cannot lower); "pallas_tpu_interpret" runs them
                      under the TPU interpreter.
  None                CPU -> reference, GPU -> pallas where the shapes fit the Triton
                      constraints (else xla), TPU -> pallas_tpu (compiled by libtpu for
                      v4/v5e/v5p/v6e in `benchmarks/tpu_compile_check.py`; not yet timed on a
                      chip).

Triton constraints shape the kernels: every loaded tile has a power-of-two size and dots need
each dimension >= 16. So GQA groups are padded to 16 query rows (decode), page ids are gathered
`pages_per_block` at a time so a K/V tile holds >= 16 tokens, and head_dim and page_size must be
powers of two (the pool is never padded: copying it would cost more than the attention).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._triton import HAS_TRITON, blocks_over_segments, cdiv, compiler_params, dot_precision, is_pow2, next_pow2
from pallas_kernels.paged_attention_tpu import paged_attention_tpu
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu

TPU_IMPLEMENTATIONS = ("pallas_tpu", "pallas_tpu_interpret")
IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_interpret", "xla", *TPU_IMPLEMENTATIONS)

# Finite stand-in for -inf: rows with no visible key keep m at this value, and exp(0)=1 there
# is harmless because the probabilities themselves are zeroed by the mask, never by exp.
_MASK_VALUE = -1e30
# Enough programs to keep every SM of an H100/H200 busy with several warps in flight.
_TARGET_PROGRAMS = 1024
# K/V tile size: 128 tokens of bf16 d128 (32 KiB per tile). K and V tiles, double-buffered by
# Triton's pipeliner, then take 128 KiB of the 227 KiB of shared memory per SM. On an H200 this
# beat 32- and 64-token tiles at 8-128 sequences x 1-4k context (benchmarks/RESULTS.md).
_TILE_BYTES = 32 * 1024
_MAX_TOKENS_PER_BLOCK = 128
_QUERY_ROWS_PER_BLOCK = 64


# ----------------------------------------------------------------------------- helpers


def _default_scale(sm_scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def _check_cache(q_heads, head_dim, k_pages, v_pages):
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    _, _, kv_heads, kv_dim = k_pages.shape
    if kv_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {kv_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    return kv_heads


def _triton_shapes_ok(page_size, head_dim):
    return is_pow2(page_size) and is_pow2(head_dim) and head_dim >= 16


def _resolve(implementation, page_size, head_dim, backend=None):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation is not None:
        if implementation in ("pallas", "pallas_interpret") and not _triton_shapes_ok(page_size, head_dim):
            raise ValueError(
                f"the Pallas kernels need power-of-two page_size and head_dim >= 16, "
                f"got page_size={page_size}, head_dim={head_dim}"
            )
        return implementation
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "reference"
    if backend == "gpu" and HAS_TRITON and _triton_shapes_ok(page_size, head_dim):
        return "pallas"
    if backend == "tpu":
        return "pallas_tpu"
    return "xla"


def _gather_kv(pages, page_table, lengths):
    """[num_seqs, pages_per_seq * page_size, kv_heads, head_dim] with masked tokens zeroed."""
    num_seqs, pages_per_seq = page_table.shape
    page_size = pages.shape[1]
    page_start = jnp.arange(pages_per_seq, dtype=jnp.int32) * page_size
    live_page = page_start[None, :] < lengths[:, None]
    safe_table = jnp.where(live_page, page_table, 0)
    kv = pages[safe_table].reshape(num_seqs, pages_per_seq * page_size, *pages.shape[2:])
    live_token = jnp.arange(pages_per_seq * page_size)[None, :] < lengths[:, None]
    return jnp.where(live_token[:, :, None, None], kv, jnp.zeros((), kv.dtype)), live_token


def _masked_softmax_fp32(logits, mask):
    logits = jnp.where(mask, logits, _MASK_VALUE)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    weights = jnp.where(mask, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(total == 0.0, 1.0, total)


# ----------------------------------------------------------------------------- decode


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None):
    """Decode attention, q [num_seqs, q_heads, head_dim] -> [num_seqs, q_heads, head_dim].

    Each query attends to the `lengths[s]` tokens of its sequence; fp32 throughout; a sequence of
    length 0 gives zeros.
    """
    num_seqs, q_heads, head_dim = q.shape
    kv_heads = _check_cache(q_heads, head_dim, k_pages, v_pages)
    group = q_heads // kv_heads
    scale = _default_scale(sm_scale, head_dim)
    k, live = _gather_kv(k_pages, page_table, lengths)
    v, _ = _gather_kv(v_pages, page_table, lengths)
    qg = q.reshape(num_seqs, kv_heads, group, head_dim).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("shgd,slhd->shgl", qg, k.astype(jnp.float32), precision=hi) * scale
    weights = _masked_softmax_fp32(logits, live[:, None, None, :])
    out = jnp.einsum("shgl,slhd->shgd", weights, v.astype(jnp.float32), precision=hi)
    return out.reshape(q.shape).astype(q.dtype)


def _paged_decode_xla(q, k_pages, v_pages, page_table, lengths, *, sm_scale):
    num_seqs, q_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    k, live = _gather_kv(k_pages, page_table, lengths)
    v, _ = _gather_kv(v_pages, page_table, lengths)
    qg = q.reshape(num_seqs, kv_heads, q_heads // kv_heads, head_dim)
    logits = jnp.einsum("shgd,slhd->shgl", qg, k, preferred_element_type=jnp.float32) * sm_scale
    weights = _masked_softmax_fp32(logits, live[:, None, None, :])
    out = jnp.einsum("shgl,slhd->shgd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def _online_softmax_step(carry, q, k, v, mask, *, sm_scale, precision):
    """One flash step over a K/V tile: q [rows, d], k/v [tokens, d], mask [rows, tokens]."""
    acc, m_prev, l_prev = carry
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * sm_scale
    logits = jnp.where(mask, logits, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, logits.max(axis=1))
    probs = jnp.where(mask, jnp.exp(logits - m_next[:, None]), 0.0)
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + probs.sum(axis=1)
    pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return correction[:, None] * acc + pv, m_next, l_next


def _load_kv_tile(pages_ref, table_ref, first_page, first_token, end_token, *,
                  pages_per_block, page_size):
    """Gathers `pages_per_block` pages as one [tokens, head_dim] tile; tokens >= end are zero."""
    tokens = pages_per_block * page_size
    page_offsets = lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    page_ids = table_ref[pl.ds(first_page, pages_per_block)]
    # Ids past the end may be garbage or out of range: read page 0 instead, then mask.
    page_ids = jnp.where(first_token + page_offsets * page_size < end_token, page_ids, 0)
    tile = pages_ref[page_ids].reshape(tokens, pages_ref.shape[-1])
    live = first_token + lax.broadcasted_iota(jnp.int32, (tokens,), 0) < end_token
    return tile, live


def _load_kv_tiles(k_ref, v_ref, table_ref, first_page, first_token, end_token, *, pages_per_block,
                   page_size):
    """K and V tiles of one block of pages, and which of their tokens are live. V is zeroed where
    dead: its slots may hold NaN, and 0 * NaN would leak through P @ V even at P = 0."""
    load = functools.partial(_load_kv_tile, table_ref=table_ref, first_page=first_page,
                             first_token=first_token, end_token=end_token,
                             pages_per_block=pages_per_block, page_size=page_size)
    k, live = load(k_ref)
    v, _ = load(v_ref)
    return k, jnp.where(live[:, None], v, jnp.zeros((), v.dtype)), live


def _decode_kernel(q_ref, k_ref, v_ref, table_ref, length_ref, acc_ref, m_ref, l_ref, *,
                   sm_scale, pages_per_block, page_size, precision):
    # Program (sequence, kv head, split): all query heads of the kv head against the split's
    # pages, so K/V are read once per kv head (GQA without repetition).
    split = pl.program_id(2)
    pages_per_split = table_ref.shape[0]
    tokens_per_block = pages_per_block * page_size
    length = length_ref[0]
    split_start = split * (pages_per_split * page_size)
    split_tokens = jnp.clip(length - split_start, 0, pages_per_split * page_size)
    num_blocks = (split_tokens + tokens_per_block - 1) // tokens_per_block
    q = q_ref[...]
    rows, head_dim = q.shape

    def body(block, carry):
        first_token = split_start + block * tokens_per_block
        k, v, live = _load_kv_tiles(k_ref, v_ref, table_ref, block * pages_per_block, first_token,
                                    length, pages_per_block=pages_per_block, page_size=page_size)
        mask = jnp.broadcast_to(live[None, :], (rows, tokens_per_block))
        return _online_softmax_step(carry, q, k, v, mask, sm_scale=sm_scale, precision=precision)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), _MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _pick_pages_per_block(page_size, pages_per_seq, pages_per_block, row_bytes):
    if pages_per_block is None:
        tokens = min(_MAX_TOKENS_PER_BLOCK, _TILE_BYTES // row_bytes)
        pages_per_block = max(1, next_pow2(tokens + 1) // 2 // page_size)  # round tokens down
        pages_per_block = min(pages_per_block, next_pow2(pages_per_seq))
    # A K/V tile must hold >= 16 tokens (Triton dot) and a power-of-two count.
    pages_per_block = max(pages_per_block, cdiv(16, page_size))
    if not is_pow2(pages_per_block):
        raise ValueError(f"pages_per_block must be a power of two, got {pages_per_block}")
    return pages_per_block


def _paged_decode_pallas(q, k_pages, v_pages, page_table, lengths, *, sm_scale, interpret,
                         pages_per_block, num_splits, num_warps, num_stages):
    num_seqs, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    group = q_heads // kv_heads
    rows = max(16, next_pow2(group))
    pages_per_block = _pick_pages_per_block(page_size, pages_per_seq, pages_per_block,
                                            head_dim * k_pages.dtype.itemsize)
    blocks_per_seq = cdiv(pages_per_seq, pages_per_block)
    if num_splits is None:  # split the context when sequences x kv heads cannot fill the GPU
        num_splits = next_pow2(cdiv(_TARGET_PROGRAMS, num_seqs * kv_heads))
    num_splits = max(1, min(num_splits, blocks_per_seq))
    blocks_per_split = cdiv(blocks_per_seq, num_splits)
    num_splits = cdiv(blocks_per_seq, blocks_per_split)
    pages_per_split = blocks_per_split * pages_per_block

    table = jnp.pad(page_table.astype(jnp.int32),
                    ((0, 0), (0, num_splits * pages_per_split - pages_per_seq)))
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, pages_per_seq * page_size)
    qg = q.reshape(num_seqs, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))

    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, page_size=page_size,
                               pages_per_block=pages_per_block,
                               precision=dot_precision(q.dtype))
    pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda s, h, c: (0, 0, h, 0))
    partial_shape = (num_seqs, kv_heads, num_splits, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_seqs, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda s, h, c: (s, h, 0, 0)),
            pool_spec,
            pool_spec,
            pl.BlockSpec((None, pages_per_split), lambda s, h, c: (s, c)),
            pl.BlockSpec((None, 1), lambda s, h, c: (s, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, c: (s, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, c: (s, h, c, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, c: (s, h, c, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=None if interpret else compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(qg, k_pages, v_pages, table, lengths.reshape(num_seqs, 1))

    # Merge the splits' partial softmaxes (empty splits carry l=0 and vanish).
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    total = (l * weight).sum(axis=2)
    out = (acc * weight[..., None]).sum(axis=2) / jnp.where(total == 0.0, 1.0, total)[..., None]
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "implementation", "pages_per_block", "num_splits", "num_warps", "num_stages"))
def paged_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None,
                    implementation=None, pages_per_block=None, num_splits=None, num_warps=4,
                    num_stages=2):
    """Decode attention over paged K/V; see `paged_attention_reference` for the semantics.

    Tuning (Pallas only): `pages_per_block` pages form one K/V tile; `num_splits` splits each
    sequence's pages across programs whose partial softmaxes are merged afterwards (default:
    enough splits to reach ~1024 programs).
    """
    num_seqs, q_heads, head_dim = q.shape
    _check_cache(q_heads, head_dim, k_pages, v_pages)
    if page_table.shape[0] != num_seqs or lengths.shape != (num_seqs,):
        raise ValueError("page_table and lengths must have one row per query")
    impl = _resolve(implementation, k_pages.shape[1], head_dim)
    scale = _default_scale(sm_scale, head_dim)
    if impl in TPU_IMPLEMENTATIONS:
        return paged_attention_tpu(q, k_pages, v_pages, page_table, lengths, sm_scale=scale,
                                   pages_per_block=pages_per_block,
                                   interpret=impl == "pallas_tpu_interpret")
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, sm_scale=scale)
    if impl == "xla":
        return _paged_decode_xla(q, k_pages, v_pages, page_table, lengths, sm_scale=scale)
    return _paged_decode_pallas(q, k_pages, v_pages, page_table, lengths, sm_scale=scale,
                                interpret=impl == "pallas_interpret",
                                pages_per_block=pages_per_block, num_splits=num_splits,
                                num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- ragged


def _token_positions(cu_q_lens, kv_lengths, num_tokens):
    """Sequence id, absolute kv position and liveness of every row of the flat query array."""
    num_seqs = kv_lengths.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], token, side="right").astype(jnp.int32)
    live = token < cu_q_lens[-1]
    seq = jnp.minimum(seq, num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = kv_lengths[seq] - q_len + (token - cu_q_lens[seq])
    return seq, position, live


def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *,
                                     sm_scale=None):
    """Mixed chunked prefill and decode in one call.

    q [total_q_tokens, q_heads, head_dim] concatenates each sequence's new query tokens
    (`cu_q_lens [num_seqs + 1]` offsets). Sequence s's queries are the last
    `q_len_s = cu_q_lens[s+1] - cu_q_lens[s]` of its `kv_lengths[s]` tokens (already in the
    pages), causally masked among themselves. Rows past `cu_q_lens[-1]` give zeros.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = _check_cache(q_heads, head_dim, k_pages, v_pages)
    group = q_heads // kv_heads
    scale = _default_scale(sm_scale, head_dim)
    k, live_kv = _gather_kv(k_pages, page_table, kv_lengths)
    v, _ = _gather_kv(v_pages, page_table, kv_lengths)
    seq, position, live_q = _token_positions(cu_q_lens, kv_lengths, num_tokens)
    key_pos = jnp.arange(k.shape[1])
    mask = live_kv[seq] & (key_pos[None, :] <= position[:, None]) & live_q[:, None]
    qg = q.reshape(num_tokens, kv_heads, group, head_dim).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("thgd,tlhd->thgl", qg, k[seq].astype(jnp.float32), precision=hi) * scale
    weights = _masked_softmax_fp32(logits, mask[:, None, None, :])
    out = jnp.einsum("thgl,tlhd->thgd", weights, v[seq].astype(jnp.float32), precision=hi)
    return out.reshape(q.shape).astype(q.dtype)


def _query_blocks(cu_q_lens, kv_lengths, num_tokens, block_q):
    """Cuts every sequence's query tokens into blocks of `block_q` rows (one sequence each).

    Returns per block: sequence id, first query row, number of live rows, kv position of the
    first row, kv length (0 for unused blocks); and per query row: its block and row in it.
    The block count is static: sum_s ceil(q_len_s / B) <= num_tokens // B + num_seqs.
    """
    num_seqs = kv_lengths.shape[0]
    num_blocks = min(num_tokens, num_tokens // block_q + num_seqs)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    seq, used, within, block_begin = blocks_over_segments(q_lens, block_q, num_blocks)
    rows = jnp.where(used, jnp.clip(q_lens[seq] - within, 0, block_q), 0)
    first_row = cu_q_lens[seq] + within
    first_pos = kv_lengths[seq] - q_lens[seq] + within
    kv_len = jnp.where(used, kv_lengths[seq], 0)

    tok_seq, _, tok_live = _token_positions(cu_q_lens, kv_lengths, num_tokens)
    offset = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[tok_seq]
    tok_block = jnp.clip(block_begin[tok_seq] + offset // block_q, 0, num_blocks - 1)
    tok_row = offset % block_q
    return dict(seq=seq, first_row=first_row, rows=rows, first_pos=first_pos, kv_len=kv_len,
                tok_block=tok_block, tok_row=tok_row, tok_live=tok_live)


def _gather_query_blocks(q, blocks, block_q):
    """[num_blocks, block_q, q_heads, head_dim]; dead rows are zero."""
    row = jnp.arange(block_q, dtype=jnp.int32)
    index = blocks["first_row"][:, None] + row[None, :]
    live = row[None, :] < blocks["rows"][:, None]
    index = jnp.where(live, index, 0)
    return jnp.where(live[:, :, None, None], q[index], jnp.zeros((), q.dtype))


def _scatter_query_blocks(out_blocks, blocks):
    """Inverse of `_gather_query_blocks`: [num_blocks, block_q, ...] -> [num_tokens, ...]."""
    out = out_blocks[blocks["tok_block"], blocks["tok_row"]]
    live = blocks["tok_live"].reshape((-1,) + (1,) * (out.ndim - 1))
    return jnp.where(live, out, jnp.zeros((), out.dtype))


def _ragged_xla(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *, sm_scale, block_q):
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    group = q_heads // kv_heads
    blocks = _query_blocks(cu_q_lens, kv_lengths, num_tokens, block_q)
    table = page_table[blocks["seq"]]
    k, live_kv = _gather_kv(k_pages, table, blocks["kv_len"])
    v, _ = _gather_kv(v_pages, table, blocks["kv_len"])
    qb = _gather_query_blocks(q, blocks, block_q)
    qb = qb.reshape(*qb.shape[:2], kv_heads, group, head_dim)
    row_pos = blocks["first_pos"][:, None] + jnp.arange(block_q)[None, :]
    row_live = jnp.arange(block_q)[None, :] < blocks["rows"][:, None]
    key_pos = jnp.arange(k.shape[1])
    mask = (live_kv[:, None, :] & row_live[:, :, None]
            & (key_pos[None, None, :] <= row_pos[:, :, None]))
    logits = jnp.einsum("bqhgd,blhd->bhgql", qb, k, preferred_element_type=jnp.float32)
    weights = _masked_softmax_fp32(logits * sm_scale, mask[:, None, None])
    out = jnp.einsum("bhgql,blhd->bqhgd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = _scatter_query_blocks(out.astype(q.dtype), blocks)
    return out.reshape(q.shape)


def _ragged_kernel(q_ref, k_ref, v_ref, table_ref, meta_ref, o_ref, *, sm_scale, group_rows,
                   pages_per_block, page_size, precision):
    # Program (query block, kv head). Row r of the q tile is token r // group_rows of the block,
    # query head r % group_rows of the kv head's group.
    num_rows, head_dim = q_ref.shape
    tokens_per_block = pages_per_block * page_size
    live_tokens, first_pos, kv_len = meta_ref[0], meta_ref[1], meta_ref[2]
    # Keys any live row may see: causal bound of the last live row, never past the stored tokens.
    key_end = jnp.clip(first_pos + live_tokens, 0, kv_len)
    num_blocks = (key_end + tokens_per_block - 1) // tokens_per_block
    row_token = lax.div(lax.broadcasted_iota(jnp.int32, (num_rows,), 0), group_rows)
    row_live = row_token < live_tokens
    row_pos = first_pos + row_token
    q = q_ref[...]

    def body(block, carry):
        first_token = block * tokens_per_block
        k, v, live = _load_kv_tiles(k_ref, v_ref, table_ref, block * pages_per_block, first_token,
                                    key_end, pages_per_block=pages_per_block, page_size=page_size)
        key_pos = first_token + lax.broadcasted_iota(jnp.int32, (tokens_per_block,), 0)
        mask = (live[None, :] & row_live[:, None] & (key_pos[None, :] <= row_pos[:, None]))
        return _online_softmax_step(carry, q, k, v, mask, sm_scale=sm_scale, precision=precision)

    init = (jnp.zeros((num_rows, head_dim), jnp.float32),
            jnp.full((num_rows,), _MASK_VALUE, jnp.float32),
            jnp.zeros((num_rows,), jnp.float32))
    acc, _, l = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _ragged_pallas(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *, sm_scale,
                   interpret, block_q, pages_per_block, num_warps, num_stages):
    num_tokens, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    group = q_heads // kv_heads
    group_rows = next_pow2(group)
    block_q = max(block_q, cdiv(16, group_rows))  # q tile rows >= 16 for the Triton dot
    pages_per_block = _pick_pages_per_block(page_size, pages_per_seq, pages_per_block,
                                            head_dim * k_pages.dtype.itemsize)
    padded_pages = cdiv(pages_per_seq, pages_per_block) * pages_per_block

    blocks = _query_blocks(cu_q_lens, kv_lengths, num_tokens, block_q)
    num_blocks = blocks["seq"].shape[0]
    table = jnp.pad(page_table.astype(jnp.int32)[blocks["seq"]],
                    ((0, 0), (0, padded_pages - pages_per_seq)))
    meta = jnp.stack([blocks["rows"], blocks["first_pos"],
                      jnp.minimum(blocks["kv_len"], pages_per_seq * page_size),
                      jnp.zeros_like(blocks["rows"])], axis=1).astype(jnp.int32)
    # [blocks, block_q, kv_heads, group_rows, d] -> [blocks, kv_heads, block_q * group_rows, d]
    qb = _gather_query_blocks(q, blocks, block_q)
    qb = qb.reshape(num_blocks, block_q, kv_heads, group, head_dim)
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, group_rows - group), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_blocks, kv_heads, block_q * group_rows, head_dim)
    num_rows = block_q * group_rows

    kernel = functools.partial(_ragged_kernel, sm_scale=sm_scale, group_rows=group_rows,
                               pages_per_block=pages_per_block, page_size=page_size,
                               precision=dot_precision(q.dtype))
    pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, h: (0, 0, h, 0))
    tile_spec = pl.BlockSpec((None, None, num_rows, head_dim), lambda b, h: (b, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, kv_heads),
        in_specs=[
            tile_spec,
            pool_spec,
            pool_spec,
            pl.BlockSpec((None, padded_pages), lambda b, h: (b, 0)),
            pl.BlockSpec((None, 4), lambda b, h: (b, 0)),
        ],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct(qb.shape, q.dtype),
        compiler_params=None if interpret else compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(qb, k_pages, v_pages, table, meta)

    out = out.reshape(num_blocks, kv_heads, block_q, group_rows, head_dim)[:, :, :, :group]
    out = _scatter_query_blocks(out.transpose(0, 2, 1, 3, 4), blocks)
    return out.reshape(q.shape)


def _pick_block_q(num_tokens, num_seqs, group, block_q):
    if block_q is not None:
        if not is_pow2(block_q):
            raise ValueError(f"block_q must be a power of two, got {block_q}")
        return block_q
    # Size blocks to the mean query length: decode-heavy batches get small blocks (little
    # padding), prefill chunks get up to _QUERY_ROWS_PER_BLOCK rows of q heads.
    mean_q = cdiv(num_tokens, max(num_seqs, 1))
    cap = max(1, _QUERY_ROWS_PER_BLOCK // next_pow2(group))
    return min(next_pow2(mean_q), cap)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "implementation", "block_q", "pages_per_block", "num_warps", "num_stages"))
def ragged_paged_attention(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, *,
                           sm_scale=None, implementation=None, block_q=None, pages_per_block=None,
                           num_warps=4, num_stages=2):
    """Ragged paged attention; see `ragged_paged_attention_reference` for the semantics.

    Kernel: the query tokens of each sequence are cut into blocks of `block_q` tokens (a block
    never spans two sequences); the grid runs over (query block, kv head) and each program walks
    its sequence's pages only up to the causal bound of its last live row.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = _check_cache(q_heads, head_dim, k_pages, v_pages)
    num_seqs = kv_lengths.shape[0]
    if page_table.shape[0] != num_seqs or cu_q_lens.shape != (num_seqs + 1,):
        raise ValueError("page_table needs num_seqs rows and cu_q_lens num_seqs + 1 entries")
    impl = _resolve(implementation, k_pages.shape[1], head_dim)
    scale = _default_scale(sm_scale, head_dim)
    if impl in TPU_IMPLEMENTATIONS:
        return ragged_paged_attention_tpu(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens,
                                          sm_scale=scale, block_q=block_q,
                                          pages_per_block=pages_per_block,
                                          interpret=impl == "pallas_tpu_interpret")
    if num_tokens == 0:
        return q
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    kv_lengths = kv_lengths.astype(jnp.int32)
    if impl == "reference":
        return ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lengths,
                                                cu_q_lens, sm_scale=scale)
    bq = _pick_block_q(num_tokens, num_seqs, q_heads // kv_heads, block_q)
    if impl == "xla":
        return _ragged_xla(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens,
                           sm_scale=scale, block_q=bq)
    return _ragged_pallas(q, k_pages, v_pages, page_table, kv_lengths, cu_q_lens, sm_scale=scale,
                          interpret=impl == "pallas_interpret", block_q=bq,
                          pages_per_block=pages_per_block, num_warps=num_warps,
                          num_stages=num_stages)
