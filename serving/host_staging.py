"""Host buffers that adapter page writes lay their values out in before they go to the pools, kept for the process.

A load lays an adapter's values out page by page on the host: tens of MB for a large adapter. A fresh
buffer of that size pays page faults at its first touch, which made some loads on the 2-core CPU
machine 5-10x slower (a rank-64 load at SmolLM2-135M's shape: 180-280 ms instead of 15-45). So the
buffers are kept: one flat pair (K, V) per dtype, grown to the largest write so far, shared by every
engine of the process, so that the faults are paid once. A lock keeps two engines (threads) from
filling them at once.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

_LOCK = threading.Lock()
_BUFFERS: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}


@contextlib.contextmanager
def staging_buffers(dtype, shape):
    """(K, V): contiguous `shape` arrays of `dtype` over the process's buffers, the caller's until the block ends."""
    dtype, size = np.dtype(dtype), math.prod(shape)
    with _LOCK:
        buffers = _BUFFERS.get(dtype)
        if buffers is None or buffers[0].size < size:
            buffers = _BUFFERS[dtype] = (np.empty((size,), dtype), np.empty((size,), dtype))
        yield tuple(b[:size].reshape(shape) for b in buffers)
