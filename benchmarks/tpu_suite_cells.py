"""The timed half of `tpu_suite.py`: shapes, and every variant of every kernel as one call.

A cell is one (variant, shape); its `build()` makes the inputs on the device and returns the
call to time, so only one cell's buffers live at a time. Anything that goes wrong in a build
or a call (a missing or changed JAX API, an OOM, a lowering error) is the suite's to catch.

JAX's own TPU kernels take no `interpret` argument: in the dry run they run inside
`pltpu.force_tpu_interpret_mode()`, and a jax without it prints n/a for them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gpu_lora import make_activations, make_adapters, segments
from gpu_paged_attention import make_cache, ragged_layout
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tpu_suite_checks import DRY_RING_BLOCKS

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_tpu import flash_attention_tpu
from pallas_kernels.lora import bgmv, sgmv
from pallas_kernels.lora_tpu import bgmv_tpu, sgmv_tpu
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention
from pallas_kernels.paged_attention_tpu import paged_attention_tpu
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu
from pallas_kernels.ring_attention_tpu import ring_attention_jnp, ring_attention_tpu

BF16 = jnp.bfloat16
OURS = "mosaic (ours)"

TPU = dict(
    # (batch, tokens, q_heads, kv_heads, head_dim), causal
    flash=[(4, 2048, 32, 8, 128), (1, 8192, 16, 4, 128), (2, 4096, 16, 16, 64)],
    # (num_seqs, context, q_heads, kv_heads, head_dim, page_size), every sequence at full context
    paged=[(32, 4096, 32, 8, 128, 16), (8, 1024, 32, 8, 128, 32), (64, 8192, 32, 8, 128, 32),
           (32, 2048, 32, 8, 64, 16)],
    # `chunks` prefill chunks of `chunk_len` new tokens + `decodes` one-token rows, all at `context`
    ragged=[dict(chunks=4, chunk_len=512, decodes=60, context=2048, heads=(32, 8, 128), page_size=16),
            dict(chunks=1, chunk_len=2048, decodes=127, context=4096, heads=(32, 8, 64), page_size=32)],
    lora=dict(in_dim=4096, out_dim=4096, ranks=(16, 64), adapters=100,
              bgmv=[(1, 1), (32, 16), (256, 100), (1024, 100)],  # (tokens, adapters)
              sgmv={"4 x 1024": [1024] * 4, "64 x 64": [64] * 64,
                    "uneven 7": [1500, 3, 700, 1, 45, 1748, 99]}),
    # (batch, tokens per device, q_heads, kv_heads, head_dim, causal)
    ring=[(1, 4096, 32, 8, 128, True), (1, 4096, 8, 8, 128, False)],
)
# The dry run: one shape for each kind of cell (flash fwd and fwd+bwd, paged, ragged, BGMV, SGMV, ring), each
# kernel in the TPU interpreter, where one shape's compilation takes seconds.
DRY = dict(
    flash=[(1, 128, 4, 2, 64)],
    paged=[(3, 64, 4, 2, 128, 16)],
    ragged=[dict(chunks=2, chunk_len=20, decodes=3, context=48, heads=(4, 2, 128), page_size=16)],
    lora=dict(in_dim=256, out_dim=128, ranks=(16, 32), adapters=5, bgmv=[(1, 1)],
              sgmv={"uneven 3": [17, 1, 9]}),
    ring=[(1, 16, 4, 2, 128, True)],
)


class Table(NamedTuple):
    key: str
    title: str
    unit: str  # "TFLOP/s" or "GB/s"
    per_unit: float  # work per unit: 1e12 flops or 1e9 bytes
    baseline: str
    variants: list
    shapes: list
    work: dict  # shape -> flops or bytes of one call


class Cell(NamedTuple):
    priority: int  # lower starts first: ours and the baseline, then the rest
    table: str
    shape: str
    variant: str
    build: Callable[[], Callable[[], object]]


def _normal(key, shape, dtype=BF16):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _interpreted(fn, interpret):
    """`fn` traced under the TPU interpreter (dry run), for kernels without `interpret`."""
    if not interpret:
        return fn

    def call(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)
    return call


def _table(key, title, unit, baseline, variants, shapes, work):
    return Table(key, title, unit, 1e12 if unit == "TFLOP/s" else 1e9, baseline,
                 [name for name, *_ in variants], shapes, work)


# ----------------------------------------------------------------------------- flash


def _flash_example(q, k, v):
    """JAX's TPU flash example: [b, h, t, d] and MHA only, so K/V are repeated and all three
    transposed inside the timed call (ours transposes inside too)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as example

    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out = example.flash_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), causal=True,
                                  sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return jnp.swapaxes(out, 1, 2)


def flash_cells(cfg, interpret):
    variants = [
        (OURS, lambda q, k, v: flash_attention_tpu(q, k, v, causal=True, interpret=interpret)[0],
         0, False),
        ("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="xla"), 0, False),
        ("reference (ours, fp32 softmax)",
         lambda q, k, v: flash_attention_reference(q, k, v, causal=True)[0], 1, False),
        ("jax tpu flash example", _flash_example, 1, True),
    ]

    def build(attention, shape, mode, example):
        batch, tokens, q_heads, kv_heads, head_dim = shape
        q = _normal(0, (batch, tokens, q_heads, head_dim))
        k, v = (_normal(i, (batch, tokens, kv_heads, head_dim)) for i in (1, 2))
        if mode == "fwd":
            fn = jax.jit(attention)
            args = (q, k, v)
        else:
            fn = jax.jit(lambda q, k, v, d_out: jax.vjp(attention, q, k, v)[1](d_out))
            args = (q, k, v, _normal(3, q.shape))
        fn = _interpreted(fn, interpret and example)
        return lambda: fn(*args)

    shapes, work, cells = [], {}, []
    for shape in cfg["flash"]:
        batch, tokens, q_heads, kv_heads, head_dim = shape
        forward = 4 * batch * q_heads * tokens * tokens * head_dim / 2
        for mode, flops in (("fwd", forward), ("fwd+bwd", 3.5 * forward)):
            name = f"b{batch} t{tokens} h{q_heads}/{kv_heads} d{head_dim} {mode}"
            shapes.append(name)
            work[name] = flops
            cells += [Cell(priority, "flash", name, variant,
                           functools.partial(build, attention, shape, mode, example))
                      for variant, attention, priority, example in variants]
    table = _table("flash", "flash attention, causal, bf16; TFLOP/s: fwd = 4*B*H*T^2*D/2, "
                   "fwd+bwd = 3.5 x fwd", "TFLOP/s", "xla", variants, shapes, work)
    return table, cells


# ----------------------------------------------------------------------------- paged decode


def _pages_per_block(pages_per_seq, page_size, tokens=512):
    """The largest divisor of pages_per_seq with at most `tokens` tokens (JAX's example needs a
    divisor)."""
    return max(d for d in range(1, pages_per_seq + 1)
               if pages_per_seq % d == 0 and d * page_size <= max(tokens, page_size))


def _paged_example(interpret):
    from jax.experimental.pallas.ops.tpu.paged_attention import (
        paged_attention as example,
    )

    def prepare(q, k, v, table, lens):
        # Its pools are [kv_heads, pages, page_size, d]: transposed once, outside the timed call.
        k_t, v_t = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)
        block = _pages_per_block(table.shape[1], k.shape[1])
        fn = _interpreted(jax.jit(lambda q, k, v, lens, table: example(
            q, k, v, lens, table, pages_per_compute_block=block)), interpret)
        return lambda: fn(q, k_t, v_t, lens, table)
    return prepare


def paged_cells(cfg, interpret):
    ours = jax.jit(functools.partial(paged_attention_tpu, interpret=interpret))
    xla = functools.partial(paged_attention, implementation="xla")
    variants = [
        (OURS, lambda *a: (lambda: ours(*a)), 0),
        ("xla (ours)", lambda *a: (lambda: xla(*a)), 0),
        ("jax tpu paged example", _paged_example(interpret), 1),
    ]

    def build(prepare, shape):
        num_seqs, context, q_heads, kv_heads, head_dim, page_size = shape
        cache_cfg = dict(page_size=page_size, kv_heads=kv_heads, head_dim=head_dim, dtype=BF16)
        k, v, table, lens = make_cache(np.random.default_rng(0), [context] * num_seqs,
                                       context // page_size, cache_cfg, poison=False)
        return prepare(_normal(4, (num_seqs, q_heads, head_dim)), k, v, table, lens)

    shapes, work, cells = [], {}, []
    for shape in cfg["paged"]:
        num_seqs, context, q_heads, kv_heads, head_dim, page_size = shape
        name = f"s{num_seqs} ctx{context} h{q_heads}/{kv_heads} d{head_dim} p{page_size}"
        shapes.append(name)
        work[name] = num_seqs * context * kv_heads * head_dim * 2 * 2  # K and V, bf16
        cells += [Cell(priority, "paged", name, variant, functools.partial(build, prepare, shape))
                  for variant, prepare, priority in variants]
    table = _table("paged", "paged decode attention, bf16; GB/s of K/V bytes read",
                   "GB/s", "xla (ours)", variants, shapes, work)
    return table, cells


# ----------------------------------------------------------------------------- ragged


def _ragged_example(interpret):
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ragged_paged_attention,
    )

    def prepare(q, k, v, table, lens, cu):
        # Its pool interleaves K and V heads, [pages, page_size, 2 * kv_heads, d]: built once.
        pages, page_size, kv_heads, head_dim = k.shape
        kv = jnp.stack([k, v], axis=3).reshape(pages, page_size, 2 * kv_heads, head_dim)
        num_seqs = jnp.asarray([lens.shape[0]], jnp.int32)
        # Its tuned block table reads the TPU generation; the CPU dry run names blocks instead.
        blocks = dict(num_kv_pages_per_block=table.shape[1], num_queries_per_block=8) if interpret else {}
        fn = _interpreted(jax.jit(lambda q, kv, lens, table, cu, n: ragged_paged_attention(
            q, kv, lens, table, cu, n, sm_scale=1.0 / math.sqrt(head_dim), **blocks)), interpret)
        return lambda: fn(q, kv, lens, table, cu, num_seqs)
    return prepare


def ragged_cells(cfg, interpret):
    ours = jax.jit(functools.partial(ragged_paged_attention_tpu, interpret=interpret))
    xla = functools.partial(ragged_paged_attention, implementation="xla")
    variants = [
        (OURS, lambda *a: (lambda: ours(*a)), 0),
        ("xla (ours)", lambda *a: (lambda: xla(*a)), 0),
        ("jax tpu ragged example", _ragged_example(interpret), 1),
    ]

    def build(prepare, spec):
        q_heads, kv_heads, head_dim = spec["heads"]
        cache_cfg = dict(page_size=spec["page_size"], kv_heads=kv_heads, head_dim=head_dim,
                         dtype=BF16)
        kv_lens, q_lens = ragged_layout(spec)
        k, v, table, lens = make_cache(np.random.default_rng(0), kv_lens,
                                       -(-spec["context"] // spec["page_size"]), cache_cfg,
                                       poison=False)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        return prepare(_normal(5, (int(cu[-1]), q_heads, head_dim)), k, v, table, lens, cu)

    shapes, work, cells = [], {}, []
    for spec in cfg["ragged"]:
        q_heads, kv_heads, head_dim = spec["heads"]
        name = (f"{spec['chunks']}x{spec['chunk_len']} + {spec['decodes']} dec ctx{spec['context']}"
                f" h{q_heads}/{kv_heads} d{head_dim} p{spec['page_size']}")
        shapes.append(name)
        work[name] = sum(ragged_layout(spec)[0]) * kv_heads * head_dim * 2 * 2
        cells += [Cell(priority, "ragged", name, variant, functools.partial(build, prepare, spec))
                  for variant, prepare, priority in variants]
    table = _table("ragged", "ragged paged attention (chunked prefill + decode), bf16; GB/s of "
                   "K/V bytes of every sequence's context", "GB/s", "xla (ours)", variants,
                   shapes, work)
    return table, cells


# ----------------------------------------------------------------------------- LoRA


def lora_cells(cfg, interpret):
    spec = cfg["lora"]
    in_dim, out_dim, max_rank = spec["in_dim"], spec["out_dim"], max(spec["ranks"])
    rng = np.random.default_rng(0)
    variants = [(OURS, "ours", 0), ("xla gather+einsum", "xla", 0)]

    def build(kind, impl, num_tokens, num_adapters, routing):
        a, b, s = make_adapters(jax.random.key(0), num_adapters, spec, BF16)
        x, y = make_activations(jax.random.key(1), num_tokens, spec, BF16)
        if kind == "bgmv":
            fn = (functools.partial(bgmv_tpu, interpret=interpret) if impl == "ours"
                  else functools.partial(bgmv, implementation="xla"))
        else:
            fn = (functools.partial(sgmv_tpu, interpret=interpret) if impl == "ours"
                  else functools.partial(sgmv, implementation="xla"))
        return lambda: fn(y, x, a, b, *routing, s)

    def moved(used, num_tokens):  # adapters stacked at max rank: the padding is read too
        return (len(np.unique(used)) * (in_dim + out_dim) * max_rank
                + num_tokens * (in_dim + 2 * out_dim)) * 2

    shapes, work, cells = [], {}, []
    for num_tokens, num_adapters in spec["bgmv"]:
        indices = rng.integers(0, num_adapters, num_tokens).astype(np.int32)
        name = f"bgmv t{num_tokens} a{num_adapters}"
        shapes.append(name)
        work[name] = moved(indices, num_tokens)
        cells += [Cell(priority, "lora", name, variant, functools.partial(
            build, "bgmv", impl, num_tokens, num_adapters, (jnp.asarray(indices),)))
            for variant, impl, priority in variants]
    for mix, lengths in spec["sgmv"].items():
        num_tokens = sum(lengths)
        starts, adapters = segments(lengths, spec["adapters"], rng)
        name = f"sgmv {mix} (t{num_tokens}) a{spec['adapters']}"
        shapes.append(name)
        work[name] = moved(np.asarray(adapters), num_tokens)
        cells += [Cell(priority, "lora", name, variant, functools.partial(
            build, "sgmv", impl, num_tokens, spec["adapters"], (starts, adapters)))
            for variant, impl, priority in variants]
    table = _table("lora", f"batched LoRA (BGMV / SGMV), bf16, in {in_dim} -> out {out_dim}, "
                   f"ranks {'/'.join(map(str, spec['ranks']))} stacked at {max_rank}; GB/s of "
                   "adapter + activation bytes", "GB/s", "xla gather+einsum", variants, shapes,
                   work)
    return table, cells


# ----------------------------------------------------------------------------- ring


def ring_cells(cfg, interpret):
    devices = jax.devices()
    variants = [
        (OURS, functools.partial(ring_attention_tpu, interpret=interpret,
                                 **(DRY_RING_BLOCKS if interpret else {})), 0),
        ("jnp ring (ppermute + reference)", ring_attention_jnp, 0),
    ]

    def build(local, shape):
        batch, per_device, q_heads, kv_heads, head_dim, causal = shape
        mesh = Mesh(np.array(devices), ("ring",))
        rows = P(None, "ring")
        place = lambda x: jax.device_put(x, NamedSharding(mesh, rows))
        tokens = per_device * len(devices)
        q = place(_normal(6, (batch, tokens, q_heads, head_dim)))
        k, v = (place(_normal(i, (batch, tokens, kv_heads, head_dim))) for i in (7, 8))
        fn = jax.jit(jax.shard_map(
            functools.partial(local, axis_name="ring", causal=causal), mesh=mesh,
            in_specs=(rows, rows, rows), out_specs=(rows, P(None, None, "ring"))))
        return lambda: fn(q, k, v)

    shapes, work, cells = [], {}, []
    for shape in cfg["ring"]:
        batch, per_device, q_heads, kv_heads, head_dim, causal = shape
        tokens = per_device * len(devices)
        name = (f"b{batch} {len(devices)}x{per_device} h{q_heads}/{kv_heads} d{head_dim} "
                f"{'causal' if causal else 'full'}")
        shapes.append(name)
        work[name] = 4 * batch * q_heads * tokens * tokens * head_dim / (2 if causal else 1)
        cells += [Cell(priority, "ring", name, variant, functools.partial(build, local, shape))
                  for variant, local, priority in variants]
    table = _table("ring", f"ring attention forward over {len(devices)} devices, bf16; TFLOP/s "
                   "summed over the ring, 4*B*H*T^2*D (/2 causal)", "TFLOP/s",
                   "jnp ring (ppermute + reference)", variants, shapes, work)
    return table, cells


def all_cells(cfg, interpret):
    """[(Table, [Cell])] in print order; ring only with >= 2 devices."""
    builders = [flash_cells, paged_cells, ragged_cells, lora_cells]
    if len(jax.devices()) >= 2:
        builders.append(ring_cells)
    return [builder(cfg, interpret) for builder in builders]
