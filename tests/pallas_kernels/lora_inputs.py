"""Random stacked LoRA adapters, shared by the GPU and TPU kernel tests."""

import jax.numpy as jnp
import numpy as np


def random_adapters(rng, num_adapters, in_dim, out_dim, max_rank, dtype):
    """(lora_a, lora_b, scales, ranks): adapters of random ranks in [1, max_rank] (the first at
    max_rank), zero-padded to max_rank as the kernels require."""
    ranks = rng.integers(1, max_rank + 1, num_adapters)
    ranks[0] = max_rank
    a = rng.standard_normal((num_adapters, in_dim, max_rank)) / np.sqrt(in_dim)
    b = rng.standard_normal((num_adapters, max_rank, out_dim)) / np.sqrt(max_rank)
    for i, r in enumerate(ranks):
        a[i, :, r:] = 0.0
        b[i, r:, :] = 0.0
    scales = rng.uniform(0.25, 2.0, num_adapters)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(scales, jnp.float32), ranks
