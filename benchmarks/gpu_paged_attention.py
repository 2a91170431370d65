"""Paged attention on one GPU: our Pallas kernels against our XLA path and JAX's Pallas example.

1. Correctness on the GPU against the fp32 reference (decode bf16 and fp32, ragged bf16, XLA
   path), on poisoned caches (NaN in every slot no sequence owns), printed as PASS/FAIL.
2. Median decode times at (num_seqs, context) in {(32, 4096), (8, 1024), (128, 2048)},
   32 q / 8 kv heads, head_dim 128, bf16, page 16, every sequence at full context; then the
   ragged kernel at one prefill + decode mix. Every variant fails soft.
   One table last: variant, shape, ms, TB/s of KV bytes read, fraction of the 3.9 TB/s copy
   bandwidth (H200, see DESIGN.md), time relative to JAX's example (ragged: to our XLA path).

    python benchmarks/gpu_paged_attention.py            # GPU, about a minute on an H200
    python benchmarks/gpu_paged_attention.py --dry-run  # CPU, tiny shapes, interpret mode

KV bytes read = sum of lengths x kv_heads x head_dim x 2 (K and V) x bytes per element.
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

from pallas_kernels.paged_attention import (  # noqa: E402
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

COPY_BANDWIDTH_TBS = 3.9
GPU = dict(q_heads=32, kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16,
           decode=[(32, 4096), (8, 1024), (128, 2048)],
           # ragged: 4 prefill chunks of 512 new tokens + 60 decodes, all at 2048 context.
           ragged=dict(context=2048, chunks=4, chunk_len=512, decodes=60))
DRY = dict(q_heads=4, kv_heads=2, head_dim=32, page_size=8, dtype=jnp.float32,
           decode=[(3, 64), (2, 40)],
           ragged=dict(context=48, chunks=2, chunk_len=20, decodes=3))
TIME_BUDGET_S = 65.0  # cells start in priority order until this much time has passed


# ----------------------------------------------------------------------------- inputs


def make_cache(rng, lengths, pages_per_seq, cfg, poison):
    """Pool with shuffled page ids. With `poison`, every slot that holds no token is NaN and
    page-table entries past a length are garbage; otherwise the table is all valid ids."""
    page_size, kv_heads, head_dim = cfg["page_size"], cfg["kv_heads"], cfg["head_dim"]
    num_seqs = len(lengths)
    num_pages = num_seqs * pages_per_seq + 7
    ids = rng.permutation(num_pages)[: num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq)
    shape = (num_pages, page_size, kv_heads, head_dim)
    key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
    k = jax.random.normal(key_k, shape, jnp.float32).astype(cfg["dtype"])
    v = jax.random.normal(key_v, shape, jnp.float32).astype(cfg["dtype"])
    table = ids.copy()
    if poison:
        live = np.zeros((num_pages, page_size), bool)
        for s, n in enumerate(lengths):
            used = -(-n // page_size)
            for p in range(used):
                live[ids[s, p], : min(page_size, n - p * page_size)] = True
            table[s, used:] = rng.integers(-999, 999, pages_per_seq - used)
        dead = jnp.asarray(~live)[:, :, None, None]
        k = jnp.where(dead, jnp.nan, k).astype(cfg["dtype"])
        v = jnp.where(dead, jnp.nan, v).astype(cfg["dtype"])
    return k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def ragged_layout(spec):
    """(kv_lengths, q_lens) of the mix: prefill chunks ending at the context, then decodes."""
    kv = [spec["context"]] * (spec["chunks"] + spec["decodes"])
    q = [spec["chunk_len"]] * spec["chunks"] + [1] * spec["decodes"]
    return kv, q


# ----------------------------------------------------------------------------- correctness


def check_correctness(cfg, interpret):
    impl = "pallas_interpret" if interpret else "pallas"
    rng = np.random.default_rng(1)
    small = cfg is DRY
    lengths = [0, 1, 15, 16, 17, 40, 64] if small else [0, 1, 15, 16, 17, 300, 1000, 2048]
    pages_per_seq = -(-max(lengths) // cfg["page_size"]) + 1
    q_heads, head_dim = cfg["q_heads"], cfg["head_dim"]
    cases = []
    for dtype, tol in ((cfg["dtype"], 2e-2), (jnp.float32, 1e-3)):
        # bf16: P is rounded to bf16 before P @ V and outputs round to bf16 (2^-8 relative);
        # fp32: the kernel's dots run in IEEE fp32, so only summation order differs.
        cases.append((f"decode {jnp.dtype(dtype).name}", "decode", dtype, tol, impl))
    cases.append(("decode xla", "decode", cfg["dtype"], 2e-2, "xla"))
    cases.append(("ragged", "ragged", cfg["dtype"], 2e-2, impl))
    cases.append(("ragged xla", "ragged", cfg["dtype"], 2e-2, "xla"))
    all_pass = True
    for name, kind, dtype, tol, implementation in cases:
        try:
            dcfg = dict(cfg, dtype=dtype)
            k, v, table, lens = make_cache(rng, lengths, pages_per_seq, dcfg, poison=True)
            if kind == "decode":
                q = jnp.asarray(rng.standard_normal((len(lengths), q_heads, head_dim)), dtype)
                out = paged_attention(q, k, v, table, lens, implementation=implementation)
                ref = paged_attention_reference(q, k, v, table, lens)
            else:
                q_lens = [0, 1, 15, 16, 1, 33, 7, 1] if not small else [0, 1, 15, 1, 8, 33, 1]
                cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
                q = jnp.asarray(rng.standard_normal((int(cu[-1]) + 3, q_heads, head_dim)), dtype)
                out = ragged_paged_attention(q, k, v, table, lens, cu,
                                             implementation=implementation)
                ref = ragged_paged_attention_reference(q, k, v, table, lens, cu)
            got, want = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            err = float(np.max(np.abs(got - want)))
            ok = bool(np.isfinite(got).all()) and err < tol
            all_pass &= ok
            print(f"[check] {name:<14} max abs err {err:.2e} (tol {tol:.0e})  "
                  f"{'PASS' if ok else 'FAIL'}", flush=True)
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            all_pass = False
            print(f"[check] {name}: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=3)
    return all_pass


# ----------------------------------------------------------------------------- variants


def jax_example_decode(interpret):
    """JAX's Pallas GPU example; its pool is [kv_heads, pages, page_size, d] (transposed once,
    outside the timed call) and `k_splits` must divide pages_per_seq."""
    from jax.experimental.pallas.ops.gpu import paged_attention as example

    def prepare(q, k, v, table, lens):
        k_t, v_t = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)
        pages_per_seq = table.shape[1]
        k_splits = 16
        while pages_per_seq % k_splits:
            k_splits //= 2
        fn = jax.jit(lambda q, k_t, v_t, table, lens: example.paged_attention(
            q, k_t, v_t, table, lens, k_splits=k_splits, interpret=interpret))
        return lambda: fn(q, k_t, v_t, table, lens)
    return prepare


def ours_decode(implementation, **options):
    def prepare(q, k, v, table, lens):
        return lambda: paged_attention(q, k, v, table, lens, implementation=implementation,
                                       **options)
    return prepare


def ours_ragged(implementation, **options):
    def prepare(q, k, v, table, lens, cu):
        return lambda: ragged_paged_attention(q, k, v, table, lens, cu,
                                              implementation=implementation, **options)
    return prepare


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
    cell_budget = 0.05 if dry_run else 0.3
    check_correctness(cfg, interpret=dry_run)

    pallas = "pallas_interpret" if dry_run else "pallas"
    decode_variants = [  # (name, builder, priority): lower priority numbers run first
        ("pallas (ours)", ours_decode(pallas), 0),
        ("jax example", jax_example_decode(dry_run), 0),
        ("xla (ours)", ours_decode("xla"), 1),
        ("dispatch (ours)", ours_decode(None), 1),
    ]
    if not dry_run:
        decode_variants += [
            ("pallas (ours, 1 split)", ours_decode(pallas, num_splits=1), 2),
            ("pallas (ours, 32-token tiles)", ours_decode(pallas, pages_per_block=2), 2),
            ("pallas (ours, 64-token tiles)", ours_decode(pallas, pages_per_block=4), 3),
            ("pallas (ours, 8 warps)", ours_decode(pallas, num_warps=8), 3),
        ]
    ragged_variants = [
        ("ragged pallas (ours)", ours_ragged(pallas), 0),
        ("ragged xla (ours)", ours_ragged("xla"), 1),
        ("ragged dispatch (ours)", ours_ragged(None), 2),
    ]
    if not dry_run:
        ragged_variants.append(
            ("ragged pallas (ours, 8 warps)", ours_ragged(pallas, num_warps=8), 3))

    rng = np.random.default_rng(0)
    shapes = [f"decode s{n} ctx{c}" for n, c in cfg["decode"]]
    ragged_kv, ragged_q = ragged_layout(cfg["ragged"])
    ragged_shape = (f"ragged {cfg['ragged']['chunks']}x{cfg['ragged']['chunk_len']} prefill "
                    f"+ {cfg['ragged']['decodes']} decode ctx{cfg['ragged']['context']}")
    inputs, kv_bytes = {}, {}
    itemsize = jnp.dtype(cfg["dtype"]).itemsize
    per_token = cfg["kv_heads"] * cfg["head_dim"] * 2 * itemsize
    for name, (num_seqs, context) in zip(shapes, cfg["decode"]):
        inputs[name] = (num_seqs, context)
        kv_bytes[name] = num_seqs * context * per_token
    kv_bytes[ragged_shape] = sum(ragged_kv) * per_token

    def build(shape):
        if shape == ragged_shape:
            pages = -(-cfg["ragged"]["context"] // cfg["page_size"])
            k, v, table, lens = make_cache(rng, ragged_kv, pages, cfg, poison=False)
            cu = jnp.asarray(np.concatenate([[0], np.cumsum(ragged_q)]), jnp.int32)
            q = jax.random.normal(jax.random.key(3), (int(cu[-1]), cfg["q_heads"],
                                                      cfg["head_dim"]), cfg["dtype"])
            return (q, k, v, table, lens, cu)
        num_seqs, context = inputs[shape]
        k, v, table, lens = make_cache(rng, [context] * num_seqs, context // cfg["page_size"],
                                       cfg, poison=False)
        q = jax.random.normal(jax.random.key(2), (num_seqs, cfg["q_heads"], cfg["head_dim"]),
                              cfg["dtype"])
        return (q, k, v, table, lens)

    cells = sorted([(p, s, n, b) for n, b, p in decode_variants for s in shapes]
                   + [(p, ragged_shape, n, b) for n, b, p in ragged_variants],
                   key=lambda cell: cell[0])
    results, built = {}, {}
    for priority, shape, name, builder in cells:
        if time.perf_counter() - started > (60.0 if dry_run else TIME_BUDGET_S):
            results[(name, shape)] = "skipped: time budget"
            continue
        try:
            if shape not in built:
                built.clear()  # keep one shape's buffers on the device at a time
                built[shape] = build(shape)
            ms = median_ms(builder(*built[shape]), jax.block_until_ready, cell_budget, **dry_run_samples(dry_run))
            results[(name, shape)] = ms
            print(f"[time] {name:<32} {shape:<44} {ms:9.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001 - fail soft, report, go on
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            results[(name, shape)] = message
            print(f"[time] {name:<32} {shape:<44} FAILED {message}", flush=True)

    device = "cpu interpret (dry run)" if dry_run else str(jax.devices()[0].device_kind)
    print_table(results, shapes + [ragged_shape], kv_bytes,
                [n for n, _, _ in decode_variants] + [n for n, _, _ in ragged_variants],
                ragged_shape, device, cfg)
    print(f"total {time.perf_counter() - started:.1f} s", flush=True)


def print_table(results, shapes, kv_bytes, names, ragged_shape, device, cfg):
    print(f"\npaged attention, {jnp.dtype(cfg['dtype']).name}, {device}, "
          f"{cfg['q_heads']}q/{cfg['kv_heads']}kv heads, d{cfg['head_dim']}, "
          f"page {cfg['page_size']}; last column: time / baseline time (lower is better); "
          "baseline: jax example (decode), xla (ours) (ragged)")
    header = (f"{'variant':<32} {'shape':<44} {'ms':>9} {'TB/s':>6} "
              f"{'of 3.9':>6} {'vs base':>8}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        base_name = "ragged xla (ours)" if shape == ragged_shape else "jax example"
        base = results.get((base_name, shape))
        for name in names:
            value = results.get((name, shape))
            if value is None:
                continue
            if isinstance(value, float):
                tbs = kv_bytes[shape] / (value * 1e-3) / 1e12
                ratio = f"{value / base:8.2f}" if isinstance(base, float) else f"{'-':>8}"
                print(f"{name:<32} {shape:<44} {value:9.3f} {tbs:6.2f} "
                      f"{tbs / COPY_BANDWIDTH_TBS:6.2f} {ratio}")
            else:
                print(f"{name:<32} {shape:<44} {value[:120]}")


if __name__ == "__main__":
    main()
