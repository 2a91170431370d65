"""Size buckets: the padded sizes a jitted program sees, so that the number of its compilations stays small."""

from __future__ import annotations


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two ≥ n (and ≥ minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def page_bucket(n: int, minimum: int = 1) -> int:
    """The next power of two, or three quarters of it when that holds n (two sizes per doubling).

    Page-table widths use it: the dense attention gathers every column, so a tighter width saves
    gather work on every step (SmolLM2, batch 8: 8 pages instead of 16 is about 8% of a decode step's
    CPU time) for at most one more compilation per doubling of the context. So do adapter page
    writes and the adapters' stored value counts."""
    width = bucket(n, minimum)
    tighter = width * 3 // 4
    return tighter if width % 4 == 0 and tighter >= max(n, minimum) else width
