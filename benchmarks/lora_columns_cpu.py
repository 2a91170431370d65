"""What the CPU's adapter products cost in one step: every column for every token, or a step's long rows on
their own adapters' columns alone (`LoraColumns.tail_columns`).

The serving working set on CPU lays a step's adapters side by side (`jvila.models.lora.LoraColumns`): each
token multiplies all C columns and keeps its own adapter's. At SmolLM2-135M's shape (q/k/v/o of 30
layers, 16 adapters of S-LoRA's ranks 8-64 in 512 columns), this times the adapters' products of
  decode   16 rows, one token each (every token needs different columns: all of them);
  prompt   a 256-token step: 16 decoding rows, then prompts of `--tail-adapters` adapters filling the rest,
           with all 512 columns ("all") and with the prompts' tokens on their adapters' columns ("tail"),
beside the base model's own q/k/v/o products of the same tokens ("base"), in float32 and bfloat16 adapters
(the base stays float32). The last column is each time over the base's.

    python benchmarks/lora_columns_cpu.py [--tail-adapters 1 4] [--repeats 10]
    python benchmarks/lora_columns_cpu.py --dry-run       # seconds: what the dry-run test runs
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jvila.models.lora import LoraColumns, ModuleLora, columns_lora

DIMS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)}
RANKS = (8, 16, 32, 64)


def products(base, weights, indices, x, with_lora: bool):
    """Every layer's q/k/v/o products of x (and the adapters'), summed so that nothing is left out."""
    total = jnp.zeros((), jnp.float32)
    for layer, modules in enumerate(weights.layers):
        for name, module in modules.items():
            y = x[:, : DIMS[name][0]] @ base[layer][name]
            if with_lora:
                y = columns_lora(y, x[:, : DIMS[name][0]], module, indices, weights)
            total = total + y.sum()
    return total


def interleaved_medians(calls, repeats: int) -> list[float]:
    """Median ms of each call, their samples taken in turns (a change in the machine's speed hits all alike)."""
    for call in calls:
        jax.block_until_ready(call())  # compile
    samples = [[] for _ in calls]
    for _ in range(repeats):
        for call, times in zip(calls, samples):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(times) for times in samples]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tail-adapters", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true", help="2 layers, 1 repeat")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.layers, args.repeats = 2, 1
    rng = np.random.default_rng(0)
    rows, tokens = 16, 256
    ranks = [RANKS[i % len(RANKS)] for i in range(rows)]  # 16 adapters: 480 columns, in 512
    owner = np.full((512,), -1, np.int32)
    owner[: sum(ranks)] = np.repeat(np.arange(rows), ranks)
    starts = np.cumsum([0, *ranks])
    base = [{m: jnp.asarray(rng.standard_normal(d) * 0.05, jnp.float32) for m, d in DIMS.items()}
            for _ in range(args.layers)]
    jitted = jax.jit(products, static_argnames="with_lora")
    print(f"# lora_columns_cpu {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} jax {jax.__version__} "
          f"{jax.devices()[0].device_kind}; {args.layers} layers of q/k/v/o at SmolLM2-135M's widths, 16 adapters "
          f"of ranks {RANKS} in 512 columns; median of {args.repeats}")
    print(f"{'step':>24} {'adapters':>9} {'base ms':>8} {'+LoRA ms':>9} {'LoRA ms':>8} {'x base':>7}")
    for dtype in (jnp.float32, jnp.bfloat16):
        layers = tuple({m: ModuleLora(jnp.asarray(rng.standard_normal((512, i)) * 0.05, dtype),
                                      jnp.asarray(rng.standard_normal((512, o)) * 0.05, dtype))
                        for m, (i, o) in DIMS.items()} for _ in range(args.layers))
        full = LoraColumns(layers, jnp.asarray(owner), jnp.ones((512,), jnp.float32), 512)
        cases = [("decode, 16 rows", full, np.arange(rows))]
        for n in args.tail_adapters:
            prompt = np.repeat(np.arange(n), -(-(tokens - rows) // n))[: tokens - rows]  # n prompts fill the rest
            indices = np.concatenate([np.arange(rows), prompt])
            used = np.concatenate([np.arange(starts[a], starts[a + 1]) for a in range(n)])
            size = max(8, 1 << (len(used) - 1).bit_length())
            tail = np.full((size,), 512, np.int32)
            tail[: len(used)] = used
            cases.append((f"prompt {n} adapter(s), all", full, indices))
            cases.append((f"prompt {n} adapter(s), tail", LoraColumns(layers, full.column_adapters, full.column_scales,
                                                                      512, jnp.asarray(tail), rows), indices))
        calls = []
        for _, weights, indices in cases:
            x = jnp.asarray(rng.standard_normal((len(indices), 576)), jnp.float32)
            indices = jnp.asarray(indices, jnp.int32)
            calls += [functools.partial(jitted, base, weights, indices, x, with_lora) for with_lora in (False, True)]
        times = interleaved_medians(calls, args.repeats)
        for (label, *_), plain, lora in zip(cases, times[::2], times[1::2]):
            print(f"{label:>24} {jnp.dtype(dtype).name:>9} {plain:>8.1f} {lora:>9.1f} {lora - plain:>8.1f} "
                  f"{(lora - plain) / plain:>6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
