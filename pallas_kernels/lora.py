"""Batched LoRA over stacked adapters (Punica / vLLM semantics): BGMV for decode, SGMV for prefill.

For every token with adapter i:  y += (x @ A_i) @ B_i * scale_i, the `x @ A_i` intermediate in
fp32. Adapters are stacked:
  lora_a  [num_adapters, in_dim, max_rank]
  lora_b  [num_adapters, max_rank, out_dim]
  scales  [num_adapters] fp32 (PEFT's alpha / r, or 1.0 when already folded into B)
An adapter of rank r < max_rank must be zero-padded: A_i[:, r:] = 0 and B_i[r:, :] = 0. The
kernels compute over the full max_rank, so garbage in the padding would leak into the output.
Adapter index -1 means "no adapter": that row of y is returned unchanged.

Kernel design (shared by BGMV and SGMV). Tokens are grouped so that every block of
`block_tokens` rows uses ONE adapter: SGMV segments are already contiguous per adapter; BGMV
sorts tokens by adapter first. Two Pallas (Triton) kernels follow, as in Punica:
  shrink  grid (block, k split): xa = x[rows] @ A[adapter], fp32, summed over in_dim chunks;
  expand  grid (block, out tile): y[rows] += xa @ B[adapter] * scale, written in place.
Grouping rather than a per-token gather lets the dots run on tensor cores (>= 16 rows) and
reads each adapter once per block instead of once per token when tokens share adapters; with
all-distinct adapters it degrades to one block per token, which still reads each adapter's
weights exactly once (the unavoidable cost). A block's padding rows repeat the block's first
token, so they recompute and rewrite that token's exact value: no masked stores are needed.

Implementations (`implementation=`): "reference" (fp32 jnp, the ground truth), "xla" (gather
the adapters per token + einsum, the usual baseline), "pallas" (Triton, GPU),
"pallas_interpret" (same kernels, interpreted; CPU tests), "pallas_tpu" (the Mosaic TPU
kernel of `lora_tpu.py`: groups of contiguous rows, the adapter of each block read from SMEM by
the index maps, any shapes), "pallas_tpu_interpret" (that kernel in the TPU interpreter; CPU
tests), None = CPU -> reference, GPU -> pallas when the shapes fit Triton (power-of-two
max_rank >= 16, in/out dims with a power-of-two divisor >= 16), else xla; TPU -> pallas_tpu
(the Triton kernels above gather rows with vector indices, which Mosaic TPU cannot lower; the
TPU kernel is compiled by libtpu in `benchmarks/tpu_compile_check.py`, not yet timed on a chip).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._triton import HAS_TRITON, blocks_over_segments, compiler_params, dot_precision, is_pow2

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_interpret", "pallas_tpu",
                   "pallas_tpu_interpret", "xla")
_TPU_IMPLEMENTATIONS = ("pallas_tpu", "pallas_tpu_interpret")

_BLOCK_K = 256  # in_dim chunk of the shrink loop (at most)
_TILE_BYTES = 32 * 1024  # A chunk [block_k, max_rank]: 256 x 64 bf16
_BLOCK_N = 128  # out_dim tile of the expand kernel
_TARGET_PROGRAMS = 256  # shrink programs wanted to fill an H100/H200 (132 SMs)


# ----------------------------------------------------------------------------- helpers


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap."""
    return min(n & -n, cap)


def _check_shapes(y, x, lora_a, lora_b, scales):
    num_tokens, in_dim = x.shape
    num_adapters, a_in, max_rank = lora_a.shape
    if y.shape[0] != num_tokens:
        raise ValueError(f"x has {num_tokens} rows but y has {y.shape[0]}")
    if a_in != in_dim:
        raise ValueError(f"lora_a in_dim {a_in} != x in_dim {in_dim}")
    if lora_b.shape != (num_adapters, max_rank, y.shape[1]):
        raise ValueError(f"lora_b {lora_b.shape} != {(num_adapters, max_rank, y.shape[1])}")
    if scales.shape != (num_adapters,):
        raise ValueError(f"scales {scales.shape} != ({num_adapters},)")


# Below this many tokens the gathered einsum wins on GPU: the kernel's sort and its two launches
# cost more than the small matmuls (H200, 4096 -> 4096, 1-1000 adapters; benchmarks/RESULTS.md).
BGMV_PALLAS_MIN_TOKENS = 128


def _triton_shapes_ok(in_dim, out_dim, max_rank):
    return (is_pow2(max_rank) and max_rank >= 16 and _pow2_divisor(in_dim, _BLOCK_K) >= 16
            and _pow2_divisor(out_dim, _BLOCK_N) >= 16)


def _resolve(implementation, in_dim, out_dim, max_rank, backend=None):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    shapes_ok = _triton_shapes_ok(in_dim, out_dim, max_rank)
    if implementation is not None:
        if implementation in ("pallas", "pallas_interpret") and not shapes_ok:
            raise ValueError(
                "the Pallas kernels need a power-of-two max_rank >= 16 and in/out dims with a "
                f"power-of-two divisor >= 16; got in={in_dim}, out={out_dim}, rank={max_rank}")
        return implementation
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "reference"
    if backend == "gpu" and HAS_TRITON and shapes_ok:
        return "pallas"
    if backend == "tpu":
        return "pallas_tpu"
    return "xla"


def segment_token_indices(segment_starts, segment_adapters, num_tokens):
    """Per-token adapter index (-1 outside every segment) from an SGMV segment list."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    segment = jnp.searchsorted(segment_starts, token, side="right").astype(jnp.int32) - 1
    inside = (token < segment_starts[-1]) & (segment >= 0)
    segment = jnp.clip(segment, 0, segment_adapters.shape[0] - 1)
    return jnp.where(inside, segment_adapters[segment], -1).astype(jnp.int32)


# ----------------------------------------------------------------------------- references


def bgmv_reference(y, x, lora_a, lora_b, indices, scales):
    """Returns y + (x @ A[idx]) @ B[idx] * scales[idx] per row.

    Rows whose index is -1 (or otherwise outside [0, num_adapters)) are returned unchanged.

    x [num_tokens, in_dim], y [num_tokens, out_dim], indices [num_tokens] int32. fp32 math,
    y's dtype preserved.
    """
    _check_shapes(y, x, lora_a, lora_b, scales)
    used = (indices >= 0) & (indices < lora_a.shape[0])
    adapter = jnp.where(used, indices, 0)
    hi = lax.Precision.HIGHEST
    xa = jnp.einsum("ti,tir->tr", x.astype(jnp.float32), lora_a[adapter].astype(jnp.float32),
                    precision=hi)
    delta = jnp.einsum("tr,tro->to", xa, lora_b[adapter].astype(jnp.float32), precision=hi)
    updated = (y.astype(jnp.float32) + delta * scales[adapter][:, None]).astype(y.dtype)
    return jnp.where(used[:, None], updated, y)


def sgmv_reference(y, x, lora_a, lora_b, segment_starts, segment_adapters, scales):
    """Segmented LoRA: tokens [starts[i], starts[i+1]) use adapter segment_adapters[i].

    segment_starts [num_segments + 1] int32 (starts[0] = 0; starts[-1] = valid tokens, the rest
    are returned unchanged), segment_adapters [num_segments] int32 (-1 allowed).
    """
    indices = segment_token_indices(segment_starts, segment_adapters, x.shape[0])
    return bgmv_reference(y, x, lora_a, lora_b, indices, scales)


def _bgmv_xla(y, x, lora_a, lora_b, indices, scales):
    used = (indices >= 0) & (indices < lora_a.shape[0])
    adapter = jnp.where(used, indices, 0)
    xa = jnp.einsum("ti,tir->tr", x, lora_a[adapter], preferred_element_type=jnp.float32)
    delta = jnp.einsum("tr,tro->to", xa, lora_b[adapter], preferred_element_type=jnp.float32)
    updated = (y.astype(jnp.float32) + delta * scales[adapter][:, None]).astype(y.dtype)
    return jnp.where(used[:, None], updated, y)


# ----------------------------------------------------------------------------- grouping


def _token_blocks(order, group_starts, group_adapters, num_blocks, block_tokens):
    """Blocks of `block_tokens` rows, each inside one group of same-adapter tokens.

    `order[p]` is the token at position p of the grouped sequence; group g covers positions
    [group_starts[g], group_starts[g+1]). Returns block_rows [num_blocks, block_tokens] (token
    ids; padding rows repeat the block's first token) and block_adapter [num_blocks] (-1 for
    blocks left over or belonging to adapter -1).
    """
    sizes = jnp.where(group_adapters >= 0, group_starts[1:] - group_starts[:-1], 0)
    group, used, offset, _ = blocks_over_segments(sizes, block_tokens, num_blocks)
    first = group_starts[group] + offset
    live_rows = jnp.clip(group_starts[group + 1] - first, 1, block_tokens)
    row = jnp.arange(block_tokens, dtype=jnp.int32)
    position = first[:, None] + jnp.minimum(row[None, :], live_rows[:, None] - 1)
    position = jnp.clip(position, 0, order.shape[0] - 1)
    block_rows = jnp.where(used[:, None], order[position], 0).astype(jnp.int32)
    block_adapter = jnp.where(used, group_adapters[group], -1).astype(jnp.int32)
    return block_rows, block_adapter


def _shrink_kernel(rows_ref, adapter_ref, x_ref, a_ref, xa_ref, *, block_k, chunks_per_split,
                   compute_dtype, precision):
    adapter = adapter_ref[0]
    k_begin = pl.program_id(1) * (chunks_per_split * block_k)  # outside the cond (interpreter)
    zeros = jnp.zeros(xa_ref.shape, jnp.float32)

    def body(chunk, acc):
        k0 = k_begin + chunk * block_k
        xs = x_ref[rows_ref[...], pl.ds(k0, block_k)].astype(compute_dtype)
        a = a_ref[adapter, pl.ds(k0, block_k), :].astype(compute_dtype)
        return acc + lax.dot_general(xs, a, (((1,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

    # One store of either result: two stores to the same tile from differently laid-out
    # threads would race on the GPU. Blocks without an adapter read nothing.
    xa_ref[...] = lax.cond(adapter >= 0,
                           lambda: lax.fori_loop(0, chunks_per_split, body, zeros),
                           lambda: zeros)


def _expand_kernel(rows_ref, adapter_ref, xa_ref, b_ref, scales_ref, y_ref, _, out_ref, *,
                   block_n):
    adapter = adapter_ref[0]
    n0 = pl.program_id(1) * block_n  # outside pl.when: the interpreter cannot see it inside

    @pl.when(adapter >= 0)
    def _():
        rows = rows_ref[...]
        b = b_ref[adapter, :, pl.ds(n0, block_n)].astype(jnp.float32)
        # The fp32 intermediate meets B in fp32 (IEEE): rank is small, so this costs little.
        delta = lax.dot_general(xa_ref[...], b, (((1,), (0,)), ((), ())),
                                precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
        old = y_ref[rows, pl.ds(n0, block_n)].astype(jnp.float32)
        out_ref[rows, pl.ds(n0, block_n)] = (old + delta * scales_ref[adapter]).astype(
            out_ref.dtype)


def _grouped_lora_pallas(y, x, lora_a, lora_b, scales, block_rows, block_adapter, *, interpret,
                         num_warps, num_stages):
    num_blocks, block_tokens = block_rows.shape
    if not (is_pow2(block_tokens) and block_tokens >= 16):
        raise ValueError(f"block_tokens must be a power of two >= 16, got {block_tokens}")
    num_adapters, in_dim, max_rank = lora_a.shape
    out_dim = y.shape[1]
    # Keep an A chunk within _TILE_BYTES so double-buffered chunks fit in shared memory.
    itemsize = jnp.dtype(jnp.promote_types(x.dtype, lora_a.dtype)).itemsize
    tile_cap = max(16, _TILE_BYTES // (max_rank * itemsize))
    block_k = _pow2_divisor(in_dim, min(_BLOCK_K, 1 << (tile_cap.bit_length() - 1)))
    block_n = _pow2_divisor(out_dim, _BLOCK_N)
    num_chunks = in_dim // block_k
    # Few blocks (small decode batches) leave SMs idle: split the in_dim reduction as well.
    want = max(1, _TARGET_PROGRAMS // num_blocks)
    k_splits = max(s for s in range(1, min(want, num_chunks) + 1) if num_chunks % s == 0)
    compute_dtype = jnp.promote_types(x.dtype, lora_a.dtype)
    params = None if interpret else compiler_params(num_warps, num_stages)
    adapter_col = block_adapter.reshape(num_blocks, 1)

    shrink = functools.partial(_shrink_kernel, block_k=block_k,
                               chunks_per_split=num_chunks // k_splits,
                               compute_dtype=compute_dtype,
                               precision=dot_precision(compute_dtype))
    xa = pl.pallas_call(
        shrink,
        grid=(num_blocks, k_splits),
        in_specs=[
            pl.BlockSpec((None, block_tokens), lambda b, s: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, s: (b, 0)),
            pl.BlockSpec(x.shape, lambda b, s: (0, 0)),
            pl.BlockSpec(lora_a.shape, lambda b, s: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_tokens, max_rank), lambda b, s: (s, b, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((k_splits, num_blocks, block_tokens, max_rank),
                                       jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="lora_shrink",
    )(block_rows, adapter_col, x, lora_a)
    xa = xa.sum(axis=0) if k_splits > 1 else xa[0]

    expand = functools.partial(_expand_kernel, block_n=block_n)
    return pl.pallas_call(
        expand,
        grid=(num_blocks, out_dim // block_n),
        in_specs=[
            pl.BlockSpec((None, block_tokens), lambda b, n: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, n: (b, 0)),
            pl.BlockSpec((None, block_tokens, max_rank), lambda b, n: (b, 0, 0)),
            pl.BlockSpec(lora_b.shape, lambda b, n: (0, 0, 0)),
            pl.BlockSpec(scales.shape, lambda b, n: (0,)),
            pl.BlockSpec(y.shape, lambda b, n: (0, 0)),
            pl.BlockSpec(y.shape, lambda b, n: (0, 0)),
        ],
        out_specs=pl.BlockSpec(y.shape, lambda b, n: (0, 0)),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        # The output starts as (a copy of) y, so rows no block touches (adapter -1, past the
        # last segment) keep their values. Reads come from the other, never-written y operand:
        # a padding row that repeats a token must not see that token's already-updated value.
        input_output_aliases={6: 0},
        compiler_params=params,
        interpret=interpret,
        name="lora_expand",
    )(block_rows, adapter_col, xa, lora_b, scales.astype(jnp.float32), y, y)


# ----------------------------------------------------------------------------- entry points


_STATIC = ("implementation", "block_tokens", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def bgmv(y, x, lora_a, lora_b, indices, scales, *, implementation=None, block_tokens=None,
         num_warps=4, num_stages=2):
    """Decode LoRA, one adapter index per token; semantics of `bgmv_reference`.

    The Pallas path sorts tokens by adapter and runs the grouped shrink/expand kernels on blocks
    of `block_tokens` same-adapter tokens (see the module docstring); default 16 on GPU and
    `lora_tpu.BGMV_BLOCK_TOKENS` on TPU.
    """
    _check_shapes(y, x, lora_a, lora_b, scales)
    num_tokens, in_dim = x.shape
    num_adapters, _, max_rank = lora_a.shape
    impl = _resolve(implementation, in_dim, y.shape[1], max_rank)
    if implementation is None and impl == "pallas" and num_tokens < BGMV_PALLAS_MIN_TOKENS:
        impl = "xla"
    indices = indices.astype(jnp.int32)
    if num_tokens == 0:
        return y
    if impl == "reference":
        return bgmv_reference(y, x, lora_a, lora_b, indices, scales)
    if impl == "xla":
        return _bgmv_xla(y, x, lora_a, lora_b, indices, scales)
    if impl in _TPU_IMPLEMENTATIONS:
        # Imported here: lora_tpu imports this module.
        from pallas_kernels.lora_tpu import BGMV_BLOCK_TOKENS, bgmv_tpu

        return bgmv_tpu(y, x, lora_a, lora_b, indices, scales,
                        block_tokens=block_tokens or BGMV_BLOCK_TOKENS,
                        interpret=impl == "pallas_tpu_interpret")
    block_tokens = block_tokens or 16
    # Sort by adapter; -1 (and out-of-range ids) go to a last group that gets no blocks.
    key = jnp.where((indices >= 0) & (indices < num_adapters), indices, num_adapters)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.bincount(key, length=num_adapters + 1)
    group_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    group_adapters = jnp.append(jnp.arange(num_adapters, dtype=jnp.int32), -1)
    # sum_a ceil(n_a / B) <= T // B + #adapters, and every block holds >= 1 token.
    num_blocks = min(num_tokens, num_tokens // block_tokens + num_adapters)
    block_rows, block_adapter = _token_blocks(order, group_starts, group_adapters, num_blocks,
                                              block_tokens)
    return _grouped_lora_pallas(y, x, lora_a, lora_b, scales, block_rows, block_adapter,
                                interpret=impl == "pallas_interpret", num_warps=num_warps,
                                num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sgmv(y, x, lora_a, lora_b, segment_starts, segment_adapters, scales, *, implementation=None,
         block_tokens=None, num_warps=4, num_stages=2):
    """Prefill LoRA over contiguous per-adapter segments; semantics of `sgmv_reference`.

    The Pallas path cuts every segment into blocks of `block_tokens` tokens (one adapter per
    block) and runs the grouped shrink/expand kernels; default 32 on GPU and
    `lora_tpu.SGMV_BLOCK_TOKENS` on TPU.
    """
    _check_shapes(y, x, lora_a, lora_b, scales)
    num_tokens, in_dim = x.shape
    num_adapters, _, max_rank = lora_a.shape
    impl = _resolve(implementation, in_dim, y.shape[1], max_rank)
    segment_starts = segment_starts.astype(jnp.int32)
    segment_adapters = segment_adapters.astype(jnp.int32)
    if num_tokens == 0:
        return y
    if impl in ("reference", "xla"):
        indices = segment_token_indices(segment_starts, segment_adapters, num_tokens)
        fn = bgmv_reference if impl == "reference" else _bgmv_xla
        return fn(y, x, lora_a, lora_b, indices, scales)
    if impl in _TPU_IMPLEMENTATIONS:
        # Imported here: lora_tpu imports this module.
        from pallas_kernels.lora_tpu import SGMV_BLOCK_TOKENS, sgmv_tpu

        return sgmv_tpu(y, x, lora_a, lora_b, segment_starts, segment_adapters, scales,
                        block_tokens=block_tokens or SGMV_BLOCK_TOKENS,
                        interpret=impl == "pallas_tpu_interpret")
    block_tokens = block_tokens or 32
    num_segments = segment_adapters.shape[0]
    # Tokens past starts[-1] belong to no segment; clamp so a bad indptr cannot read past x.
    starts = jnp.clip(segment_starts, 0, num_tokens)
    adapters = jnp.where(segment_adapters < num_adapters, segment_adapters, -1)
    num_blocks = min(num_tokens, num_tokens // block_tokens + num_segments)
    order = jnp.arange(num_tokens, dtype=jnp.int32)
    block_rows, block_adapter = _token_blocks(order, starts, adapters, num_blocks, block_tokens)
    return _grouped_lora_pallas(y, x, lora_a, lora_b, scales, block_rows, block_adapter,
                                interpret=impl == "pallas_interpret", num_warps=num_warps,
                                num_stages=num_stages)
