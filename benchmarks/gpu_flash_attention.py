"""Flash attention on one GPU: our Pallas kernel against cuDNN, JAX's examples, XLA and PyTorch.

1. Correctness of the Pallas kernel on the GPU against the fp32 reference (forward, lse and
   gradients), printed as max errors and PASS/FAIL.
2. Median times of forward and forward+backward, bf16, causal, at three shapes, for every
   variant that runs; each variant fails soft (its error is printed, the rest go on).
   One table last: variant, shape, ms, TFLOP/s, time relative to cuDNN.

    python benchmarks/gpu_flash_attention.py            # GPU, about two minutes on an H200
    python benchmarks/gpu_flash_attention.py --dry-run  # CPU, tiny shapes, interpret mode

FLOP convention: forward = 4 * batch * q_heads * q_len * kv_len * head_dim (two matmuls),
halved when causal; forward+backward = 3.5 x forward (the backward's five matmuls are 2.5 x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROCESS_START = time.perf_counter()

# PyTorch runs in a child process on the same GPU: JAX must not take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from device_guard import require_backend  # noqa: E402
from timing import dry_run_samples, median_ms  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.flash_attention import (  # noqa: E402
    default_block_sizes,
    flash_attention,
    flash_attention_pallas,
    flash_attention_reference,
)

# (batch, seq, q_heads, kv_heads, head_dim)
GPU_SHAPES = [(2, 8192, 32, 32, 128), (8, 2048, 32, 32, 64), (2, 4096, 32, 8, 128)]
DRY_SHAPES = [(1, 128, 4, 2, 32)]
# Cells start in priority order until this many seconds after start-up; the suite gives the
# script 150 s, and one cell (compile + timing) or the torch child may run past the budget.
GPU_TIME_BUDGET_S = 105.0
DRY_TIME_BUDGET_S = 60.0
HARD_DEADLINE_S = 135.0
TORCH_TIMEOUT_S = 40.0
# Alternatives to the defaults (default_block_sizes), tried last if time is left.
ALT_CONFIGS = {
    "fwd q64 k64": dict(block_q=64, block_k=64, num_warps=4),
    "bwd 32x64": dict(backward_block_sizes=(32, 64, 64, 32), num_warps_bwd=4),
    "bwd 32x128 w8": dict(backward_block_sizes=(32, 128, 128, 32), num_warps_bwd=8),
}


def shape_name(shape):
    batch, seq, q_heads, kv_heads, head_dim = shape
    return f"b{batch} t{seq} h{q_heads}/{kv_heads} d{head_dim}"


def forward_flops(shape, causal=True):
    batch, seq, q_heads, _, head_dim = shape
    flops = 4 * batch * q_heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def random_inputs(shape, dtype, seed=0):
    batch, seq, q_heads, kv_heads, head_dim = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, d_out


def describe(exc):
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "(no message)"
    return f"{type(exc).__name__}: {first_line}"


# --------------------------------------------------------------------------
# Correctness on the device
# --------------------------------------------------------------------------


def check_correctness(dry_run):
    """Pallas kernel vs the fp32 reference on this device; returns True when all pass."""
    interpret = dry_run
    cases = [
        # name, shape (batch, seq, q_heads, kv_heads, head_dim), dtype, extras, tolerance.
        # bf16: P and dS are rounded to bf16 inside the kernel (2^-8 relative).
        ("bf16 causal gqa", (2, 1000, 8, 2, 128), jnp.bfloat16, {}, 3e-2),
        # fp32 on GPU: Triton's default fp32 dot is TF32 (10-bit mantissa).
        (
            "fp32 causal segments+offset",
            (1, 777, 4, 4, 64),
            jnp.float32,
            {"segments": True, "q_offset": 5},
            1e-2,
        ),
    ]
    if dry_run:
        cases = [(name, (1, 75, 4, 2, 32), dtype, extra, tol) for name, _, dtype, extra, tol in cases]
    all_pass = True
    for name, shape, dtype, extra, tol in cases:
        try:
            q, k, v, d_out = random_inputs(shape, dtype, seed=1)
            kwargs = dict(causal=True)
            if extra.get("segments"):
                seq = shape[1]
                ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(2), 0.01, (shape[0], seq)), axis=1)
                kwargs.update(q_segment_ids=ids.astype(jnp.int32), kv_segment_ids=ids.astype(jnp.int32))
            if "q_offset" in extra:
                kwargs["q_offset"] = extra["q_offset"]
            blocks = dict(block_q=32, block_k=32, backward_block_sizes=(32, 32, 32, 32)) if dry_run else {}

            def ours(q, k, v):
                return flash_attention_pallas(q, k, v, interpret=interpret, **blocks, **kwargs)

            def reference(q, k, v):
                return flash_attention_reference(q, k, v, **kwargs)

            (out, lse), vjp = jax.vjp(jax.jit(ours), q, k, v)
            grads = jax.jit(vjp)((d_out, jnp.zeros_like(lse)))
            up = lambda x: x.astype(jnp.float32)
            (ref_out, ref_lse), ref_vjp = jax.vjp(reference, up(q), up(k), up(v))
            ref_grads = ref_vjp((up(d_out), jnp.zeros_like(ref_lse)))

            def rel_err(got, want):
                got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
                return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))

            finite = np.isfinite(np.asarray(ref_lse))
            lse_err = float(np.max(np.abs(np.asarray(lse)[finite] - np.asarray(ref_lse)[finite])))
            errors = {"out": rel_err(out, ref_out), "lse(abs)": lse_err}
            errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
            ok = all(e < tol for e in errors.values()) and bool(
                np.isfinite(np.asarray(out, np.float32)).all()
            )
            all_pass &= ok
            detail = "  ".join(f"{key}={val:.2e}" for key, val in errors.items())
            print(
                f"[check] {name:<28} {shape_name(shape):<22} max rel err: {detail}  "
                f"(tol {tol:.0e})  {'PASS' if ok else 'FAIL'}",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            all_pass = False
            print(f"[check] {name}: ERROR {describe(exc)}", flush=True)
            traceback.print_exc(limit=4)  # one GPU run: keep enough to debug the kernel from the log
    return all_pass


# --------------------------------------------------------------------------
# JAX variants: each returns attention(q, k, v) -> out, or raises
# --------------------------------------------------------------------------


def variant_ours(dry_run, **options):
    if dry_run:
        options = dict(block_q=32, block_k=32, backward_block_sizes=(32, 32, 32, 32), interpret=True)
    return lambda q, k, v: flash_attention_pallas(q, k, v, causal=True, **options)[0]


def variant_dispatch(dry_run):
    return lambda q, k, v: flash_attention(q, k, v, causal=True)


def variant_jax_nn(implementation):
    def attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    return lambda dry_run: attention


def _repeat_kv(q, k, v):
    group = q.shape[2] // k.shape[2]
    return jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


def variant_triton_example(dry_run):
    """JAX's Pallas Triton example (`ops.gpu.attention.mha`); MHA only, so GQA K/V are
    repeated inside the timed call (the example has no GQA)."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    def attention(q, k, v):
        if k.shape[2] != q.shape[2]:
            k, v = _repeat_kv(q, k, v)
        return triton_attention.mha(
            q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True, interpret=dry_run
        )

    return attention


def variant_mosaic_example(dry_run):
    """JAX's Mosaic GPU example (`attention_mgpu`): fp16 only and no softmax scale, so q is
    pre-scaled and inputs cast to fp16 inside the timed call (cheap next to attention)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    def attention(q, k, v):
        scale = 1.0 / math.sqrt(q.shape[-1])
        q16, k16, v16 = (q * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)
        for block_kv in (128, 64):
            try:
                config = attention_mgpu.TuningConfig(
                    block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True
                )
                return attention_mgpu.attention(q16, k16, v16, config).astype(q.dtype)
            except ValueError:
                if block_kv == 64:
                    raise

    return attention


def jax_callables(attention, q, k, v, d_out):
    forward = jax.jit(attention)

    @jax.jit
    def forward_backward(q, k, v, d_out):
        _, pullback = jax.vjp(attention, q, k, v)
        return pullback(d_out)

    return (lambda: forward(q, k, v)), (lambda: forward_backward(q, k, v, d_out))


# --------------------------------------------------------------------------
# PyTorch SDPA, in a child process (own CUDA libraries, own memory pool)
# --------------------------------------------------------------------------


def torch_child(shapes_json, dry_run, budget_s):
    import torch
    import torch.nn.functional as F

    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA here")
    dtype = torch.float32 if dry_run else torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for shape in json.loads(shapes_json):
        batch, seq, q_heads, kv_heads, head_dim = shape
        q = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        d_out = torch.randn_like(q)
        gqa = kv_heads != q_heads

        def forward():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        def forward_backward():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return torch.autograd.grad(out, (q, k, v), d_out)

        for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
            try:
                ms = median_ms(call, lambda _: sync(), budget_s, **dry_run_samples(dry_run))
                results.append({"shape": shape, "mode": mode, "ms": ms})
            except Exception as exc:  # noqa: BLE001
                results.append({"shape": shape, "mode": mode, "error": describe(exc)})
    print("TORCH_RESULTS " + json.dumps(results), flush=True)


def run_torch(shapes, dry_run, budget_s, timeout_s):
    command = [
        sys.executable,
        __file__,
        "--torch-child",
        json.dumps(shapes),
        "--cell-budget",
        str(budget_s),
    ] + (["--dry-run"] if dry_run else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout_s:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("TORCH_RESULTS "):
            return json.loads(line[len("TORCH_RESULTS ") :]), None
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return [], " | ".join(tail) or f"exit code {done.returncode}"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

TORCH = "torch sdpa"
MODES = ("fwd", "fwd+bwd")


def time_torch(results, shapes, dry_run, cell_budget, timeout_s):
    rows, error = run_torch(shapes, dry_run, cell_budget, timeout_s)
    for row in rows:
        results[(TORCH, tuple(row["shape"]), row["mode"])] = row.get("ms", row.get("error"))
        value = f"{row['ms']:9.3f} ms" if "ms" in row else f"FAILED {row['error'][:200]}"
        print(f"[time] {TORCH:<28} {shape_name(row['shape']):<22} {row['mode']:<8} {value}", flush=True)
    if error:
        print(f"[time] {TORCH} unavailable: {error[:300]}", flush=True)
        for shape in shapes:
            for mode in MODES:
                results.setdefault((TORCH, shape, mode), f"skipped: {error}")


def time_jax_variant(results, name, builder, shape, inputs, dry_run, cell_budget):
    q, k, v, d_out = inputs
    try:
        calls = jax_callables(builder(dry_run), q, k, v, d_out)
    except Exception as exc:  # noqa: BLE001
        for mode in MODES:
            results[(name, shape, mode)] = describe(exc)
        print(f"[time] {name:<28} {shape_name(shape):<22} unavailable: {describe(exc)}", flush=True)
        return
    for mode, call in zip(MODES, calls):
        try:
            ms = median_ms(call, jax.block_until_ready, cell_budget, **dry_run_samples(dry_run))
            results[(name, shape, mode)] = ms
            print(f"[time] {name:<28} {shape_name(shape):<22} {mode:<8} {ms:9.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001
            message = describe(exc)
            results[(name, shape, mode)] = message
            print(f"[time] {name:<28} {shape_name(shape):<22} {mode:<8} FAILED {message}", flush=True)
            if "ours" in name:  # our kernel's failures are worth the long message
                print(str(exc)[:1500], flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny shapes, Pallas in interpret mode: checks the script runs",
    )
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    parser.add_argument("--cell-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dry_run = args.dry_run
    # Seconds of timed repetitions per cell (at least 3 runs after 2 warm-up calls).
    cell_budget = args.cell_budget or (0.05 if dry_run else 0.3)
    if args.torch_child:
        torch_child(args.torch_child, dry_run, cell_budget)
        return

    require_backend("gpu", dry_run)
    check_correctness(dry_run)

    shapes = DRY_SHAPES if dry_run else GPU_SHAPES
    dtype = jnp.float32 if dry_run else jnp.bfloat16
    inputs = {shape: random_inputs(shape, dtype) for shape in shapes}

    variants = [
        # (name, builder, priority): lower priorities start first; TORCH times all shapes at once.
        ("pallas (ours)", variant_ours, 0),
        ("cudnn", variant_jax_nn("cudnn"), 0),
        (TORCH, None, 1),
        ("dispatch (ours)", variant_dispatch, 1),
        ("xla", variant_jax_nn("xla"), 1),
        ("pallas triton example", variant_triton_example, 2),
        ("mosaic gpu example (fp16)", variant_mosaic_example, 2),
    ]
    if not dry_run:
        variants += [
            (f"pallas (ours, {name})", lambda dry, options=options: variant_ours(dry, **options), 3)
            for name, options in ALT_CONFIGS.items()
        ]
    cells = [
        (priority, shape, name, builder)
        for name, builder, priority in variants
        for shape in (shapes[:1] if builder is None else shapes)
    ]
    cells.sort(key=lambda cell: (cell[0], shapes.index(cell[1])))  # stable: keeps variant order

    results = {}  # (name, shape, mode) -> ms, or the reason there is none
    soft_budget = DRY_TIME_BUDGET_S if dry_run else GPU_TIME_BUDGET_S
    for _, shape, name, builder in cells:
        elapsed = time.perf_counter() - PROCESS_START
        if elapsed > soft_budget:
            for shape_ in shapes if builder is None else [shape]:
                for mode in MODES:
                    results[(name, shape_, mode)] = "skipped: time budget"
            continue
        if builder is None:
            time_torch(
                results,
                shapes,
                dry_run,
                cell_budget,
                timeout_s=max(10.0, min(TORCH_TIMEOUT_S, HARD_DEADLINE_S - elapsed)),
            )
        else:
            time_jax_variant(results, name, builder, shape, inputs[shape], dry_run, cell_budget)

    print_table(
        results,
        shapes,
        [name for name, _, _ in variants],
        "cpu interpret (dry run)" if dry_run else str(jax.devices()[0].device_kind),
    )
    print(
        "notes: the pallas triton example has no GQA, so it repeats K/V inside the timed call "
        "on GQA shapes; the mosaic gpu example takes fp16 with q pre-scaled (casts timed too) "
        "and has no causal backward; dispatch (ours) picks cuDNN where it applies."
    )
    for head_dim in sorted({shape[-1] for shape in shapes}):
        print(f"pallas (ours) default blocks, head_dim {head_dim}: {default_block_sizes(head_dim)}")
    print(f"total {time.perf_counter() - PROCESS_START:.1f} s", flush=True)


def print_table(results, shapes, names, device):
    print(
        f"\nflash attention, causal, {'fp32' if device.startswith('cpu') else 'bf16'}, "
        f"{device}; TFLOP/s: fwd = 4*B*H*T^2*D/2, fwd+bwd = 3.5 x fwd; "
        "last column: time / cuDNN time (lower is better)"
    )
    header = f"{'variant':<30} {'shape':<22} {'mode':<8} {'ms':>9} {'TFLOP/s':>8} {'vs cuDNN':>9}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            baseline = results.get(("cudnn", shape, mode))
            for name in names:
                value = results.get((name, shape, mode))
                if value is None:
                    continue
                if isinstance(value, float):
                    flops = forward_flops(shape) * (3.5 if mode == "fwd+bwd" else 1.0)
                    tflops = flops / (value * 1e-3) / 1e12
                    ratio = f"{value / baseline:9.2f}" if isinstance(baseline, float) else f"{'n/a':>9}"
                    print(f"{name:<30} {shape_name(shape):<22} {mode:<8} {value:9.3f} {tflops:8.1f} {ratio}")
                else:
                    print(
                        f"{name:<30} {shape_name(shape):<22} {mode:<8} {'-':>9} {'-':>8} {'-':>9}  "
                        f"({value[:90]})"
                    )


if __name__ == "__main__":
    main()
