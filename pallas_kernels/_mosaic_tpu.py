"""What the Mosaic TPU kernels share: the TPU's tile sizes, spellings that moved between jax
releases, the interpreter settings their tests run under, and padding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# A vreg is 8 sublanes x 128 lanes of 32-bit values; HBM and VMEM arrays are tiled (8, 128).
LANES = 128
SUBLANES = 8

# Newer jax spells these pl.squeezed / CompilerParams / SMEM / pl.semaphore_*; older jax has
# None for a squeezed block dim, TPUCompilerParams, TPUMemorySpace.SMEM and pltpu.semaphore_*.
SQUEEZED = getattr(pl, "squeezed", None)
CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
SMEM = getattr(pltpu, "SMEM", None) or pltpu.TPUMemorySpace.SMEM
semaphore_signal = getattr(pl, "semaphore_signal", None) or pltpu.semaphore_signal
semaphore_wait = getattr(pl, "semaphore_wait", None) or pltpu.semaphore_wait
DeviceIdType = getattr(pl, "DeviceIdType", None) or pltpu.DeviceIdType


def interpret_params(*, detect_races: bool = True):
    """TPU interpreter settings that make mistakes loud, with whichever of them this jax has.

    Uninitialised buffers (scratch included) start as NaN, out-of-bounds reads raise, and with
    `detect_races` a DMA that overlaps a read or write of its buffer is recorded (kernels without
    manual DMAs have nothing to race and skip the cost).
    """
    wanted = {"uninitialized_memory": "nan", "out_of_bounds_reads": "raise"}
    if detect_races:
        wanted["detect_races"] = True
    known = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
    return pltpu.InterpretParams(**{k: v for k, v in wanted.items() if k in known})


def round_up(x, multiple):
    return -(-x // multiple) * multiple


def pad_axis(x, axis, length, value=0):
    """`x` padded with `value` at the end of `axis` to `length`."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def out_struct(shape, dtype, like):
    """A pallas_call output shape that varies over the same mesh axes as the array `like`.

    Inside `shard_map(check_vma=True)` a kernel's outputs must say which manual axes they vary
    over; the aval field is `manual_axis_type` on jax 0.10 and `vma` on others. Outside a
    shard_map this is a plain ShapeDtypeStruct.
    """
    aval = jax.typeof(like)
    for field in ("manual_axis_type", "vma"):
        value = getattr(aval, field, None)
        if value is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{field: value})
            except TypeError:
                continue
    return jax.ShapeDtypeStruct(shape, dtype)
