"""How fast XLA:CPU multiplies a few rows by a weight matrix, against this machine's memory bandwidth.

A decode step of a small model on CPU is a few rows (one per running request) times every weight
matrix; if the matmul streamed its weights at memory speed, the step would take weights / bandwidth.
This prints, for SmolLM2-135M's MLP projection ([rows, 576] @ [576, 1536], 30 of them chained as a
decode step chains its layers), the median time and the weight bytes per second it reaches, beside
the read bandwidth of a plain reduction over 512 MB (the same jitted XLA program style) — so the gap
between the two is the matmul kernel's, not the memory's. Other dot back-ends can be compared by
running it under XLA_FLAGS (e.g. --xla_cpu_use_onednn=true, --xla_cpu_experimental_ynn_fusion_type=).

    python benchmarks/cpu_matmul.py [--rows 1 8 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

IN, OUT, LAYERS = 576, 1536, 30


def median_s(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def chained(dtype):
    """30 dependent products, as a decode step's layers depend on one another (no two can overlap)."""

    def step(x, weights):
        acc = jnp.zeros((x.shape[0], OUT), jnp.float32)
        for w in weights:
            acc = acc + jax.lax.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)
            x = x + 1e-3 * acc[:, :IN]
        return acc

    return jax.jit(step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.random(128 * 1024 * 1024, np.float32))  # 512 MB
    read_gbs = big.nbytes / median_s(jax.jit(jnp.sum), big, repeats=args.repeats) / 1e9
    del big
    print(f"# cpu_matmul jax {jax.__version__}, {os.cpu_count()} CPU cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"read bandwidth (jnp.sum over 512 MB): {read_gbs:.1f} GB/s\n")
    print(f"{LAYERS} chained [rows, {IN}] @ [{IN}, {OUT}] products (SmolLM2-135M's MLP projection)")
    print(f"{'rows':>5} {'weights':>9} {'ms':>8} {'weight GB/s':>12} {'GFLOP/s':>8} {'of read bw':>11}")
    for dtype in (jnp.float32, jnp.bfloat16):
        weights = [jnp.asarray(rng.standard_normal((IN, OUT)), dtype) for _ in range(LAYERS)]
        nbytes = sum(w.nbytes for w in weights)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, IN)), jnp.float32)
            seconds = median_s(chained(dtype), x, weights, repeats=args.repeats)
            gbs = nbytes / seconds / 1e9
            gflops = 2 * rows * IN * OUT * LAYERS / seconds / 1e9
            print(f"{rows:>5} {jnp.dtype(dtype).name:>9} {seconds * 1e3:>8.2f} {gbs:>12.1f} {gflops:>8.1f} "
                  f"{gbs / read_gbs:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
