"""Sequence parallelism: bytes each device sends per attention layer, and activation memory per device.

For ring (contiguous and zigzag shards), LightSeq's schedule, Ulysses and 2D (Ulysses inside, ring
across) attention at several shard counts, one attention layer (causal, GQA) is compiled on
simulated CPU devices. From the compiled HLO we read every collective and the bytes one device
sends through it:

- collective-permute: its whole operand (one send per ring step);
- all-to-all: (n-1)/n of its operand (the 1/n addressed to itself stays);
- all-gather: (n-1) times its input shard; all-reduce / reduce-scatter: 2(n-1)/n / (n-1)/n of the
  operand (the ring algorithm's volume).

Beside it the analytic formula (LightSeq / LongVILA's accounting; L tokens, b rows, h query
heads, g kv heads, d head dim, s bytes per element, n shards):

- ring:    (n-1) · 2 · b·(L/n)·g·d·s (K and V round the ring) + (n-1)·b·(L/n)·4 (segment ids)
- LightSeq (causal, averaged over devices since ranks send different things): in step t < n/2,
           n-t ranks send K/V (as the ring) and t ranks send q, then get out + lse back;
           at t = n/2 half the ranks send K/V: n/2 + 1 steps instead of n
- Ulysses: (n-1)/n · b·(L/n)·(2h + 2g')·d·s (q, k, v in; out back) + (n-1)·b·(L/n)·4,
           g' = max(g, n) (K/V heads repeated up to n when fewer)
- 2D r×u:  the Ulysses term over u with L/(r·u) tokens, plus the ring term over r with L/r tokens
           and g'/u kv heads.

and the compiled memory analysis' temporaries + outputs per device (forward and backward, the
dense-per-block reference attention: what scales is the activation footprint, not the kernel),
against the sequence length. Ratios are against the one-device row of the same length.

Run: `python benchmarks/sequence_parallel.py` (8 simulated devices; `--dry-run` for small
shapes). Forward only for the bytes, since the formulas are the forward's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import flash_attention_reference
from sharding.hybrid_attention import sequence_parallel_attention
from sharding.mesh import MeshConfig, build_mesh

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(collective-permute-start|collective-permute|all-to-all|all-gather-start|"
                 r"all-gather|all-reduce-start|all-reduce|reduce-scatter)\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_GROUPS = re.compile(r"replica_groups=\{?\{([0-9,]+)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def _bytes_of(type_text: str) -> list[int]:
    return [int(np.prod([int(x) for x in dims.split(",") if x] or [1])) * _DTYPE_BYTES[dt]
            for dt, dims in _SHAPE.findall(type_text)]


def _group_size(line: str, default: int) -> int:
    if m := _GROUPS.search(line):
        return len(m.group(1).split(","))
    if m := _GROUPS_IOTA.search(line):
        return int(m.group(2))
    return default


def sent_bytes(hlo_text: str, num_devices: int) -> dict[str, int]:
    """Bytes one device sends through each kind of collective in a compiled (SPMD) HLO module."""
    sent: dict[str, int] = {}
    for line in hlo_text.splitlines():
        line = _COMMENT.sub("", line)  # tuples of more than 5 print /*index=5*/ markers
        m = _OP.search(line)
        if not m:
            continue
        result, op = m.group(1), m.group(2).removesuffix("-start")
        sizes = _bytes_of(result)
        n = _group_size(line, num_devices)
        if op == "collective-permute":
            # The async start's result is (operand, output, ...): the operand is what is sent, by
            # each source of the permutation (all devices for a ring step; some for LightSeq's).
            pairs = _PAIRS.search(line)
            sources = len(re.findall(r"\{\d+,\d+\}", pairs.group(1))) if pairs else n
            amount = sizes[0] * sources / n
        elif op == "all-to-all":
            amount = sum(sizes) * (n - 1) // n
        elif op == "all-gather":
            amount = sizes[-1] * (n - 1) // n
        elif op == "all-reduce":
            amount = sizes[0] * 2 * (n - 1) // n
        else:
            amount = sizes[0] * (n - 1)
        sent[op] = sent.get(op, 0) + amount
    return sent


def formula_bytes(strategy, ring, a2a, *, batch, seq, heads, kv_heads, head_dim, itemsize):
    def ring_term(n, length, kv):
        return (n - 1) * (2 * batch * (length // n) * kv * head_dim * itemsize + batch * (length // n) * 4)

    def ulysses_term(n, local_len, kv):
        return (n - 1) * batch * local_len * (2 * heads + 2 * kv) * head_dim * itemsize // n \
            + (n - 1) * batch * local_len * 4

    if strategy in ("ring", "zigzag"):  # the same transfers; zigzag only changes which tokens a shard holds
        return ring_term(ring, seq, kv_heads)
    if strategy == "lightseq":  # averaged over devices: each step some send K/V, others q (+ out, lse back)
        n, local = ring, seq // ring
        kv = 2 * batch * local * kv_heads * head_dim * itemsize + batch * local * 4
        q_out_lse = 2 * batch * local * heads * head_dim * itemsize + batch * local * 4 + batch * heads * local * 4
        return sum((n - t) * kv + t * q_out_lse for t in range(1, n // 2)) / n + kv / 2
    kv = max(kv_heads, a2a)
    if strategy == "ulysses":
        return ulysses_term(a2a, seq // a2a, kv)
    return ulysses_term(a2a, seq // (ring * a2a), kv) + ring_term(ring, seq, kv // a2a)


def compile_layer(strategy, ring, a2a, *, batch, seq, heads, kv_heads, head_dim, backward):
    shapes = (jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32),
              jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.float32),
              jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.float32),
              jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    if strategy == "one device":
        def layer(q, k, v, seg):
            return flash_attention_reference(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)[0]
    else:
        mesh = build_mesh(MeshConfig(fsdp=1, sequence=ring, sequence_a2a=a2a), devices=jax.devices()[: ring * a2a])

        def layer(q, k, v, seg):
            return sequence_parallel_attention(q, k, v, seg, mesh=mesh, rows=None, heads=None, causal=True,
                                               layout=LAYOUTS.get(strategy, "contiguous"),
                                               implementation="reference")
    fn = layer
    if backward:
        def fn(q, k, v, seg):
            return jax.grad(lambda q, k, v: jnp.sum(layer(q, k, v, seg)), argnums=(0, 1, 2))(q, k, v)
    return jax.jit(fn).lower(*shapes).compile()


def peak_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


LAYOUTS = {"zigzag": "zigzag", "lightseq": "lightseq"}
STRATEGIES = {"ring": lambda n: (n, 1), "zigzag": lambda n: (n, 1), "lightseq": lambda n: (n, 1), "ulysses": lambda n: (1, n), "2D": lambda n: (2, n // 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="small shapes (the test runs this)")
    args = parser.parse_args(argv)
    dims = dict(batch=1, heads=8, kv_heads=2, head_dim=64)
    lengths, shard_counts = ((1024, 4096), (2, 4, 8)) if not args.dry_run else ((64,), (4,))
    if args.dry_run:
        dims = dict(batch=1, heads=4, kv_heads=2, head_dim=8)
    print(f"# sequence parallelism, causal GQA attention {dims}, float32, {jax.device_count()} CPU devices")
    header = (f"{'strategy':<10} {'shards':>6} {'seq':>6} {'sent B/device (HLO)':>20} {'formula':>12} "
              f"{'HLO/formula':>11} {'act. MiB/device':>15} {'vs 1 device':>11}")
    print(header)
    rows = []
    for seq in lengths:
        base = peak_bytes(compile_layer("one device", 1, 1, seq=seq, backward=True, **dims))
        print(f"{'one device':<10} {1:>6} {seq:>6} {0:>20} {0:>12} {'-':>11} {base / 2**20:>15.2f} {'1.00x':>11}")
        for strategy, shape in STRATEGIES.items():
            for n in shard_counts:
                ring, a2a = shape(n)
                if strategy == "2D" and a2a < 2:
                    continue
                fwd = compile_layer(strategy, ring, a2a, seq=seq, backward=False, **dims)
                measured = round(sum(sent_bytes(fwd.as_text(), n).values()))
                want = round(formula_bytes(strategy, ring, a2a, seq=seq, itemsize=4, **dims))
                peak = peak_bytes(compile_layer(strategy, ring, a2a, seq=seq, backward=True, **dims))
                label = f"{ring}x{a2a}" if strategy == "2D" else str(n)
                rows.append((strategy, label, seq, measured, want))
                print(f"{strategy:<10} {label:>6} {seq:>6} {measured:>20} {want:>12} {measured / want:>11.3f} "
                      f"{peak / 2**20:>15.2f} {peak / base:>10.2f}x", flush=True)
    matched = sum(m == w for *_, m, w in rows)
    print(f"[check] sent bytes equal the formula in {matched}/{len(rows)} rows: "
          f"{'PASS' if matched == len(rows) else 'FAIL'}")
    return 0 if matched == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
