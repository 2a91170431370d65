"""What the Triton-lowered Pallas kernels share: compiler parameters, sizing, segment blocks.

Passing Triton compiler parameters is what selects the Triton lowering on GPU (JAX's default
there is Mosaic GPU); interpret mode ignores them, so CPU tests run the same kernel bodies.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from jax import lax

try:  # the Triton lowering warns about its deprecation from JAX 0.11 on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as _pallas_triton

    _CompilerParams = getattr(_pallas_triton, "CompilerParams", None) or _pallas_triton.TritonCompilerParams
except (ImportError, AttributeError):  # pragma: no cover - depends on the jax build
    _CompilerParams = None

HAS_TRITON = _CompilerParams is not None


def compiler_params(num_warps: int, num_stages: int):
    if _CompilerParams is None:
        raise NotImplementedError("this jax build has no Pallas Triton lowering")
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype):
    """IEEE fp32 for fp32 operands (Triton would otherwise use TF32); the MMA default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def cdiv(a, b):
    return (a + b - 1) // b


def blocks_over_segments(sizes, block_size: int, num_blocks: int):
    """Cut consecutive segments of `sizes[s]` rows into blocks of `block_size` rows, none spanning
    two segments. Returns per block (num_blocks is static, at least the blocks needed): its
    segment, whether it is used, and its first row's offset inside the segment; and per segment
    the index of its first block."""
    blocks_of_segment = (sizes + block_size - 1) // block_size
    block_end = jnp.cumsum(blocks_of_segment)
    block_begin = block_end - blocks_of_segment
    block = jnp.arange(num_blocks, dtype=jnp.int32)
    segment = jnp.searchsorted(block_end, block, side="right").astype(jnp.int32)
    used = segment < sizes.shape[0]
    segment = jnp.minimum(segment, sizes.shape[0] - 1)
    offset = (block - block_begin[segment]) * block_size
    return segment, used, offset, block_begin
