"""Batched LoRA on one GPU: our Pallas BGMV/SGMV kernels against a gather + einsum XLA baseline.

1. Correctness on the GPU against the fp32 reference (BGMV bf16 and fp32, SGMV bf16), with
   mixed ranks and index -1, printed as PASS/FAIL.
2. Median times, bf16, in 4096 -> out 4096, adapters of rank 16 and 64 mixed (stacked at max
   rank 64): BGMV at tokens x adapters in {1, 32, 256} x {1, 16, 128, 1000}, each token's
   adapter drawn uniformly; SGMV at a few segment mixes. Every variant fails soft.
   One table last: variant, shape, ms, GB/s of adapter + activation bytes, time relative to
   the XLA baseline.

    python benchmarks/gpu_lora.py            # GPU, about a minute on an H200
    python benchmarks/gpu_lora.py --dry-run  # CPU, tiny shapes, interpret mode

Bytes = distinct adapters used x (in x rank + rank x out) + tokens x (in + 2 x out), times the
element size: the weights each adapter must bring once, x read, y read and written.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from device_guard import require_backend  # noqa: E402
from timing import dry_run_samples, median_ms  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lora import bgmv, bgmv_reference, sgmv, sgmv_reference  # noqa: E402

GPU = dict(in_dim=4096, out_dim=4096, ranks=(16, 64), dtype=jnp.bfloat16,
           bgmv=[(t, n) for n in (1, 16, 128, 1000) for t in (1, 32, 256)],
           # segment lengths of each SGMV mix (one adapter per segment)
           sgmv={"4 x 512": [512] * 4, "64 x 32": [32] * 64, "1 x 2048": [2048],
                 "uneven 7": [700, 3, 300, 1, 45, 900, 99]})
DRY = dict(in_dim=64, out_dim=48, ranks=(16, 32), dtype=jnp.float32,
           bgmv=[(1, 1), (20, 5)],
           sgmv={"2 x 20": [20, 20], "uneven 3": [17, 1, 9]})
TIME_BUDGET_S = 65.0  # cells start in priority order until this much time has passed


def make_adapters(key, num_adapters, cfg, dtype):
    """Stacked adapters, ranks alternating over cfg['ranks'], zero-padded to the largest."""
    in_dim, out_dim = cfg["in_dim"], cfg["out_dim"]
    max_rank = max(cfg["ranks"])
    key_a, key_b, key_s = jax.random.split(key, 3)
    a = jax.random.normal(key_a, (num_adapters, in_dim, max_rank), jnp.float32) / in_dim**0.5
    b = jax.random.normal(key_b, (num_adapters, max_rank, out_dim), jnp.float32) / max_rank**0.5
    ranks = jnp.asarray([cfg["ranks"][i % len(cfg["ranks"])] for i in range(num_adapters)])
    live = jnp.arange(max_rank)[None, :] < ranks[:, None]
    a = jnp.where(live[:, None, :], a, 0.0).astype(dtype)
    b = jnp.where(live[:, :, None], b, 0.0).astype(dtype)
    scales = jax.random.uniform(key_s, (num_adapters,), jnp.float32, 0.5, 2.0)
    return a, b, scales


def make_activations(key, num_tokens, cfg, dtype):
    key_x, key_y = jax.random.split(key)
    x = jax.random.normal(key_x, (num_tokens, cfg["in_dim"]), jnp.float32).astype(dtype)
    y = jax.random.normal(key_y, (num_tokens, cfg["out_dim"]), jnp.float32).astype(dtype)
    return x, y


def segments(lengths, num_adapters, rng):
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    adapters = rng.integers(0, num_adapters, len(lengths)).astype(np.int32)
    return jnp.asarray(starts), jnp.asarray(adapters)


# ----------------------------------------------------------------------------- correctness


def check_correctness(cfg, interpret):
    impl = "pallas_interpret" if interpret else "pallas"
    rng = np.random.default_rng(1)
    num_tokens = 40 if interpret else 300
    cases = [  # bf16: Punica's / vLLM's bf16 tolerances; fp32: IEEE dots, summation order only
        ("bgmv bf16", "bgmv", jnp.bfloat16, dict(rtol=3e-2, atol=2e-2)),
        ("bgmv fp32", "bgmv", jnp.float32, dict(rtol=1e-4, atol=1e-4)),
        ("sgmv bf16", "sgmv", jnp.bfloat16, dict(rtol=3e-2, atol=2e-2)),
    ]
    all_pass = True
    for name, kind, dtype, tol in cases:
        try:
            a, b, scales = make_adapters(jax.random.key(5), 37, cfg, dtype)
            x, y = make_activations(jax.random.key(6), num_tokens, cfg, dtype)
            if kind == "bgmv":
                indices = jnp.asarray(rng.integers(-1, 37, num_tokens), jnp.int32)
                out = bgmv(y, x, a, b, indices, scales, implementation=impl)
                ref = bgmv_reference(y, x, a, b, indices, scales)
            else:
                cuts = np.sort(rng.choice(np.arange(1, num_tokens - 5), 6, replace=False))
                starts = jnp.asarray(np.concatenate([[0], cuts, [num_tokens - 5]]), jnp.int32)
                adapters = jnp.asarray(rng.integers(-1, 37, 7), jnp.int32)
                out = sgmv(y, x, a, b, starts, adapters, scales, implementation=impl)
                ref = sgmv_reference(y, x, a, b, starts, adapters, scales)
            got, want = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            err = float(np.max(np.abs(got - want)))
            ok = bool(np.isfinite(got).all()) and np.allclose(got, want, **tol)
            all_pass &= ok
            print(f"[check] {name:<10} max abs err {err:.2e} (rtol {tol['rtol']:.0e}, "
                  f"atol {tol['atol']:.0e})  {'PASS' if ok else 'FAIL'}", flush=True)
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            all_pass = False
            print(f"[check] {name}: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=3)
    return all_pass


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, Pallas in interpret mode: checks the script runs")
    args = parser.parse_args()
    dry_run = args.dry_run
    started = time.perf_counter()
    require_backend("gpu", dry_run)
    cfg = DRY if dry_run else GPU
    cell_budget = 0.05 if dry_run else 0.15
    check_correctness(cfg, interpret=dry_run)

    pallas = "pallas_interpret" if dry_run else "pallas"
    dtype, itemsize = cfg["dtype"], jnp.dtype(cfg["dtype"]).itemsize
    in_dim, out_dim, max_rank = cfg["in_dim"], cfg["out_dim"], max(cfg["ranks"])
    rng = np.random.default_rng(0)
    max_adapters = max(n for _, n in cfg["bgmv"])
    a_all, b_all, s_all = make_adapters(jax.random.key(0), max_adapters, cfg, dtype)

    def adapter_bytes(used):
        # Stacked at max rank: the zero padding is read too, so every adapter counts max_rank.
        return len(used) * (in_dim + out_dim) * max_rank * itemsize

    cells = []  # (priority, kind, shape name, variant, call factory, bytes)
    for num_tokens, num_adapters in cfg["bgmv"]:
        indices = jnp.asarray(rng.integers(0, num_adapters, num_tokens), jnp.int32)
        shape = f"bgmv t{num_tokens} a{num_adapters}"
        moved = adapter_bytes(np.unique(np.asarray(indices))) + num_tokens * (
            in_dim + 2 * out_dim) * itemsize
        for variant, impl, priority in (("pallas (ours)", pallas, 0),
                                        ("xla gather+einsum", "xla", 0)):
            def factory(num_tokens=num_tokens, num_adapters=num_adapters, indices=indices,
                        impl=impl):
                x, y = make_activations(jax.random.key(num_tokens), num_tokens, cfg, dtype)
                a, b, s = a_all[:num_adapters], b_all[:num_adapters], s_all[:num_adapters]
                return lambda: bgmv(y, x, a, b, indices, s, implementation=impl)
            cells.append((priority, shape, variant, factory, moved))
    for mix, lengths in cfg["sgmv"].items():
        num_tokens = sum(lengths)
        starts, adapters = segments(lengths, max_adapters, rng)
        shape = f"sgmv {mix} (t{num_tokens})"
        moved = adapter_bytes(np.unique(np.asarray(adapters))) + num_tokens * (
            in_dim + 2 * out_dim) * itemsize
        for variant, impl, priority in (("pallas (ours)", pallas, 0),
                                        ("xla gather+einsum", "xla", 0)):
            def factory(num_tokens=num_tokens, starts=starts, adapters=adapters, impl=impl):
                x, y = make_activations(jax.random.key(num_tokens), num_tokens, cfg, dtype)
                return lambda: sgmv(y, x, a_all, b_all, starts, adapters, s_all,
                                    implementation=impl)
            cells.append((priority, shape, variant, factory, moved))
        if not dry_run:
            def factory_64(num_tokens=num_tokens, starts=starts, adapters=adapters):
                x, y = make_activations(jax.random.key(num_tokens), num_tokens, cfg, dtype)
                return lambda: sgmv(y, x, a_all, b_all, starts, adapters, s_all,
                                    implementation=pallas, block_tokens=64)
            cells.append((2, shape, "pallas (ours, 64-token blocks)", factory_64, moved))
    cells.sort(key=lambda cell: cell[0])

    results, moved_bytes, shapes = {}, {}, []
    for priority, shape, variant, factory, moved in cells:
        moved_bytes[shape] = moved
        if shape not in shapes:
            shapes.append(shape)
        if time.perf_counter() - started > (60.0 if dry_run else TIME_BUDGET_S):
            results[(variant, shape)] = "skipped: time budget"
            continue
        try:
            ms = median_ms(factory(), jax.block_until_ready, cell_budget, **dry_run_samples(dry_run))
            results[(variant, shape)] = ms
            print(f"[time] {variant:<32} {shape:<28} {ms:9.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            results[(variant, shape)] = message
            print(f"[time] {variant:<32} {shape:<28} FAILED {message}", flush=True)

    device = "cpu interpret (dry run)" if dry_run else str(jax.devices()[0].device_kind)
    print(f"\nbatched LoRA, {jnp.dtype(dtype).name}, {device}, in {in_dim} -> out {out_dim}, "
          f"ranks {'/'.join(map(str, cfg['ranks']))} stacked at {max_rank}; "
          "last column: time / xla gather+einsum time (lower is better)")
    header = f"{'variant':<32} {'shape':<28} {'ms':>9} {'GB/s':>8} {'vs xla':>7}"
    print(header)
    print("-" * len(header))
    names = ["pallas (ours)", "pallas (ours, 64-token blocks)", "xla gather+einsum"]
    for shape in shapes:
        base = results.get(("xla gather+einsum", shape))
        for name in names:
            value = results.get((name, shape))
            if value is None:
                continue
            if isinstance(value, float):
                gbs = moved_bytes[shape] / (value * 1e-3) / 1e9
                ratio = f"{value / base:7.2f}" if isinstance(base, float) else f"{'-':>7}"
                print(f"{name:<32} {shape:<28} {value:9.3f} {gbs:8.1f} {ratio}")
            else:
                print(f"{name:<32} {shape:<28} {value[:120]}")
    print(f"total {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
