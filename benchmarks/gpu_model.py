"""The decoder on a GPU with the Pallas/cuDNN attention plugged in, against its dense reference.

Checks the kernel path through the whole model (cache-free logits, chunked prefill and decode
through the paged cache), then times batched generation with each attention. Random weights in
a Llama-3.2-1B-like shape (no checkpoint is needed on the GPU machine).

    python benchmarks/gpu_model.py            # GPU
    python benchmarks/gpu_model.py --dry-run  # CPU, tiny model, Pallas interpret mode
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from device_guard import require_backend  # noqa: E402
from flax import nnx  # noqa: E402

from jvila.config import LLMConfig  # noqa: E402
from jvila.generate import generate  # noqa: E402
from jvila.models import functional  # noqa: E402
from jvila.models.attention import dense_attention  # noqa: E402
from jvila.models.kernel_attention import KernelAttention  # noqa: E402
from jvila.models.kv_cache import contiguous_cache  # noqa: E402
from jvila.models.llm import LLM  # noqa: E402

GPU_CFG = LLMConfig(vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64)
DRY_CFG = LLMConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16)


def build(cfg, dtype):
    return nnx.split(LLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype))


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check(cfg, kernels, dtype, tol, seq):
    graphdef, state = build(cfg, dtype)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, seq)), jnp.int32)
    errs = {}
    want = functional.logits(graphdef, state, tokens, attention=dense_attention)
    errs["logits"] = rel_err(functional.logits(graphdef, state, tokens, attention=kernels), want)
    results = {}
    for name, attention in (("dense", dense_attention), ("kernel", kernels)):
        cache = contiguous_cache(cfg, 2, seq + 8, page_size=16, dtype=dtype)
        half = seq // 2
        num_new = jnp.asarray([half, half - 5], jnp.int32)
        first, cache = functional.extend(graphdef, state, tokens[:, :half], num_new, cache, attention=attention)
        step, cache = functional.decode_step(graphdef, state, tokens[:, half], cache, attention=attention)
        results[name] = (first, step)
    errs["prefill"] = rel_err(results["kernel"][0], results["dense"][0])
    errs["decode"] = rel_err(results["kernel"][1], results["dense"][1])
    ok = all(e < tol for e in errs.values())
    detail = "  ".join(f"{k}={v:.2e}" for k, v in errs.items())
    print(f"[check] {jnp.dtype(dtype).name:<9} rel err {detail}  (tol {tol:.0e})  {'PASS' if ok else 'FAIL'}",
          flush=True)
    return ok


def time_generate(cfg, attention, batch, prompt_len, new_tokens, dtype):
    graphdef, state = build(cfg, dtype)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, prompt_len)) for _ in range(batch)]
    run = lambda: generate(graphdef, state, prompts, max_new_tokens=new_tokens, attention=attention)  # noqa: E731
    run()  # compile
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    require_backend("gpu", args.dry_run)
    cfg = DRY_CFG if args.dry_run else GPU_CFG
    kernels = KernelAttention("pallas_interpret") if args.dry_run else KernelAttention()
    ok = True
    # float32: only summation order differs (online softmax, TF32 is not used by XLA's default here).
    # bfloat16: 30 layers of bf16 rounding in two different attention orders.
    # The dry run checks float32 alone (the interpreter's bfloat16 check repeats the same code at another dtype).
    checks = ((jnp.float32, 1e-4),) if args.dry_run else ((jnp.float32, 2e-2), (jnp.bfloat16, 1e-1))
    for dtype, tol in checks:
        try:
            ok &= check(cfg, kernels, dtype, tol, seq=48 if args.dry_run else 1000)
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            ok = False
            print(f"[check] {jnp.dtype(dtype).name}: ERROR {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            traceback.print_exc(limit=4)

    batch, prompt_len, new_tokens = (2, 20, 4) if args.dry_run else (8, 1000, 128)
    rows = []
    for name, attention in (("dense (xla)", dense_attention), ("kernels", kernels)):
        try:
            seconds = time_generate(cfg, attention, batch, prompt_len, new_tokens, jnp.bfloat16)
            rows.append((name, seconds))
        except Exception as exc:  # noqa: BLE001
            print(f"[time] {name}: ERROR {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    print(f"\nbatched generation, bf16, {cfg.num_layers} layers x hidden {cfg.hidden_size}, batch {batch}, "
          f"{prompt_len}-token prompts, {new_tokens} new tokens; last column: time / dense time")
    print(f"{'attention':<14}{'s':>9}{'tok/s':>10}{'vs dense':>10}")
    base = rows[0][1] if rows and rows[0][0].startswith("dense") else None
    for name, seconds in rows:
        ratio = f"{seconds / base:>10.2f}" if base else f"{'-':>10}"
        print(f"{name:<14}{seconds:>9.3f}{batch * new_tokens / seconds:>10.1f}{ratio}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
