"""The packed-token step on this CPU against the padded `extend` it replaces, SmolLM2-135M shape.

Random weights (the timing does not depend on their values), float32, 8 rows. Cases: a decode
step (one token per row) and a mixed step (one row's 120-token prompt chunk beside 7 decodes),
each through the padded extend (rows padded to the longest chunk), the packed extend with the
dense attention (per-row query blocks), the packed extend with the ragged reference attention
(it gathers K/V once per query token), and the full serving step (StepRunner: packed extend +
sampling + host round trip), greedy and with temperature + top-p + top-5 logprobs. Prints
medians and ratios to the padded extend last.

    python benchmarks/packed_extend_cpu.py [--context 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.config import LLMConfig, RopeConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kernel_attention import KernelAttention
from jvila.models.kv_cache import KVCache
from jvila.models.llm import LLM
from serving.step import StepBatch, StepRunner

# SmolLM2-135M(-Instruct) as its config.json gives it.
SMOLLM2 = LLMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope=RopeConfig(theta=100000.0),
                    tie_embeddings=True, max_position_embeddings=8192)
ROWS, PAGE = 8, 16


def median_times(fns: dict, repeats: int) -> dict:
    """Median (wall, process CPU) seconds per call of each fn. Calls interleave round-robin so
    that load from other processes falls on every path alike; CPU time (all threads) is the
    steadier measure of work on a shared machine."""
    for fn in fns.values():
        fn()  # compile
    times = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"), donate_argnames=("cache",))
def padded_step(graphdef, state, tokens, num_new, cache, *, attention):
    logits, cache = functional.extend(graphdef, state, tokens, num_new, cache, attention=attention)
    return jnp.argmax(logits, -1), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"), donate_argnames=("cache",))
def packed_step(graphdef, state, tokens, cu_q_lens, cache, *, attention):
    logits, cache = functional.extend_packed(graphdef, state, tokens, cu_q_lens, cache, attention=attention)
    return jnp.argmax(logits, -1), cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256, help="tokens already cached per row")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    graphdef, state = nnx.split(LLM(SMOLLM2, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    chunk = 120
    pages_per_row = -(-(args.context + chunk) // PAGE)
    num_pages = ROWS * pages_per_row
    table = rng.permutation(num_pages).reshape(ROWS, pages_per_row).astype(np.int32)
    shape = (num_pages, PAGE, SMOLLM2.num_kv_heads, SMOLLM2.head_dim)
    context = np.full(ROWS, args.context, np.int32)

    def fresh_cache():
        pools = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(SMOLLM2.num_layers))
        return KVCache(pools, tuple(p + 1 for p in pools), jnp.asarray(table), jnp.asarray(context))

    cases = {"decode (8 x 1 token)": [1] * ROWS, f"mixed (1 x {chunk} + 7 x 1)": [chunk] + [1] * (ROWS - 1)}
    results = {}
    for case, q_lens in cases.items():
        q_lens = np.asarray(q_lens)
        total = int(q_lens.sum())
        tokens = rng.integers(0, SMOLLM2.vocab_size, total).astype(np.int32)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        padded = np.zeros((ROWS, q_lens.max()), np.int32)
        for b in range(ROWS):
            padded[b, : q_lens[b]] = tokens[cu[b] : cu[b + 1]]
        packed_tokens = np.pad(tokens, (0, (1 << (total - 1).bit_length()) - total))
        holder = {}

        def run_padded():
            cache = holder.pop("cache", None) or fresh_cache()
            out, cache = padded_step(graphdef, state, jnp.asarray(padded), jnp.asarray(q_lens, jnp.int32),
                                     KVCache(cache.k_pages, cache.v_pages, cache.page_table, jnp.asarray(context)),
                                     attention=dense_attention)
            holder["cache"] = jax.block_until_ready(cache)

        def run_packed(attention):
            cache = holder.pop("cache", None) or fresh_cache()
            out, cache = packed_step(graphdef, state, jnp.asarray(packed_tokens), jnp.asarray(cu),
                                     KVCache(cache.k_pages, cache.v_pages, cache.page_table, jnp.asarray(context)),
                                     attention=attention)
            holder["cache"] = jax.block_until_ready(cache)

        runner = StepRunner(graphdef, state, num_pages=num_pages, page_size=PAGE, max_pages_per_seq=pages_per_row)
        batch = StepBatch(tokens, cu, context, table)
        sampled = StepBatch(tokens, cu, context, table, temperature=np.full(ROWS, 0.8, np.float32),
                            top_p=np.full(ROWS, 0.9, np.float32), seeds=np.arange(ROWS),
                            output_index=np.zeros(ROWS, np.int32), num_logprobs=5)
        times = median_times({
            "padded extend, dense": run_padded,
            "packed extend, dense (query blocks)": lambda: run_packed(dense_attention),
            "packed extend, ragged reference": lambda: run_packed(KernelAttention("reference")),
            "StepRunner.run (packed + greedy)": lambda: runner.run(batch),
            "StepRunner.run (top-p, logprobs)": lambda: runner.run(sampled),
        }, args.repeats)
        holder.clear()
        del runner
        results[case] = (times, total)

    print(f"\nSmolLM2-135M shape, float32, {ROWS} rows x {args.context} cached tokens, page {PAGE}, "
          f"{jax.devices()[0].platform}, median of {args.repeats}")
    print(f"{'case':28s} {'path':38s} {'wall ms':>9s} {'cpu ms':>9s} {'tok/s':>7s} {'vs padded (wall, cpu)':>22s}")
    for case, (times, total) in results.items():
        base_wall, base_cpu = times["padded extend, dense"]
        for path, (wall, cpu) in times.items():
            print(f"{case:28s} {path:38s} {wall * 1e3:9.1f} {cpu * 1e3:9.1f} {total / wall:7.0f} "
                  f"{base_wall / wall:10.2f}x {base_cpu / cpu:10.2f}x")


if __name__ == "__main__":
    main()
