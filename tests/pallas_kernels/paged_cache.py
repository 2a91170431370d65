"""A poisoned page pool for the paged-attention tests (GPU-shaped and TPU kernels alike)."""

import jax.numpy as jnp
import numpy as np


def poisoned_cache(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim, dtype, spare_pages=3):
    """K/V pools with shuffled page ids, NaN wherever no live token is stored, and page-table
    entries past each length that are garbage (negative, huge, exactly num_pages, random): a
    kernel that reads anything it should not turns the output NaN or fails out of bounds."""
    needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(needed) + spare_pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    garbage = rng.choice(np.array([-7, 10**6, num_pages, -1]), (len(lengths), pages_per_seq))
    table = np.where(rng.random(garbage.shape) < 0.5, garbage,
                     rng.integers(-10**4, 10**4, garbage.shape))
    free_ids = iter(rng.permutation(num_pages))
    for s, n in enumerate(lengths):
        for p in range(needed[s]):
            page = next(free_ids)
            table[s, p] = page
            live = min(page_size, n - p * page_size)
            k[page, :live] = rng.standard_normal((live, kv_heads, head_dim))
            v[page, :live] = rng.standard_normal((live, kv_heads, head_dim))
    return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table, jnp.int32),
            jnp.asarray(lengths, jnp.int32))
