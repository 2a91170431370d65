"""The correctness half of `tpu_suite.py`: every Mosaic TPU kernel against its reference, on the
device, printed as `[check] <name> ... PASS/FAIL`.

Inputs are bf16, with the awkward cases the kernel tests use: lengths that divide no block,
GQA, head_dim 64 and 128, poisoned paged caches (NaN in every slot no sequence owns, garbage
page ids past a length), adapter index -1. References run in fp32 at "highest" matmul precision
(on a TPU the default rounds fp32 matmul inputs to bf16). Tolerances are the kernel tests' bf16
ones; gradients get theirs scaled by the largest reference entry (dK and dV sum over every
query of a sequence).
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import numpy as np
from gpu_lora import make_activations, make_adapters
from gpu_paged_attention import make_cache
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention_tpu import flash_attention_tpu
from pallas_kernels.lora import bgmv_reference, sgmv_reference
from pallas_kernels.lora_tpu import bgmv_tpu, sgmv_tpu
from pallas_kernels.paged_attention import (
    paged_attention_reference,
    ragged_paged_attention_reference,
)
from pallas_kernels.paged_attention_tpu import paged_attention_tpu
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu
from pallas_kernels.ring_attention_tpu import ring_attention_tpu

BF16 = jnp.bfloat16
ATTENTION_TOL = dict(atol=3e-2, rtol=3e-2)  # flash / ring bf16 outputs
LSE_TOL = dict(atol=1e-3, rtol=1e-3)  # fp32 lse of the same bf16 scores
GRAD_TOL = 2e-2  # x max |reference| for atol, and rtol
PAGED_TOL = dict(atol=2e-2, rtol=2e-2)
LORA_TOL = dict(atol=2e-2, rtol=3e-2)  # Punica's / vLLM's bf16 tolerances
# On the 2-core CPU the TPU interpreter deadlocks in `_allocate_buffer` for the ring kernel at
# head_dim >= 64 with its default 128-token blocks (every simulated device stuck converting its
# buffer); 16-token blocks run. The dry run only: on a TPU the defaults are what is checked.
DRY_RING_BLOCKS = dict(block_q=16, block_k=16)


def _normal(key, shape, dtype=BF16):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _fp32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def _reference(fn, *args, **kwargs):
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _compare(pairs):
    """[(label, got, want, tol)] -> (all close and finite, max abs error per label)."""
    ok, errors = True, {}
    for label, got, want, tol in pairs:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        finite = np.isfinite(want)  # lse is -inf on rows that see no key, on both sides
        errors[label] = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
        ok &= bool(np.array_equal(np.isfinite(got), finite))
        ok &= bool(np.allclose(got[finite], want[finite], **tol))
    return ok, errors


# ----------------------------------------------------------------------------- cases


def flash_forward(small, interpret):
    shape = (1, 77, 4, 2, 128) if small else (2, 1000, 8, 2, 128)
    batch, tokens, q_heads, kv_heads, head_dim = shape
    q = _normal(0, (batch, tokens, q_heads, head_dim))
    k, v = (_normal(i, (batch, tokens, kv_heads, head_dim)) for i in (1, 2))
    out, lse = jax.jit(lambda q, k, v: flash_attention_tpu(q, k, v, causal=True,
                                                           interpret=interpret))(q, k, v)
    ref_out, ref_lse = _reference(flash_attention_reference, *_fp32(q, k, v), causal=True)
    return [("out", out, ref_out, ATTENTION_TOL), ("lse", lse, ref_lse, LSE_TOL)]


def flash_backward(small, interpret):
    """Forward + backward with packed segments (several documents per row), d64, MHA."""
    shape = (1, 60, 4, 4, 64) if small else (1, 777, 8, 8, 64)
    batch, tokens, q_heads, kv_heads, head_dim = shape
    q = _normal(3, (batch, tokens, q_heads, head_dim))
    k, v = (_normal(i, (batch, tokens, kv_heads, head_dim)) for i in (4, 5))
    d_out = _normal(6, q.shape)
    ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(7), 4 / tokens, (batch, tokens)), axis=1)
    ids = ids.astype(jnp.int32)

    def grads(attention, q, k, v, d_out):
        (_, lse), pullback = jax.vjp(lambda q, k, v: attention(
            q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids), q, k, v)
        return pullback((d_out, jnp.zeros_like(lse)))

    got = jax.jit(lambda *a: grads(lambda *b, **c: flash_attention_tpu(
        *b, **c, interpret=interpret), *a))(q, k, v, d_out)
    want = _reference(lambda *a: grads(flash_attention_reference, *a), *_fp32(q, k, v, d_out))
    return [(f"d{name}", g, w, dict(atol=GRAD_TOL * float(jnp.max(jnp.abs(w))), rtol=GRAD_TOL))
            for name, g, w in zip("qkv", got, want)]


def _paged_inputs(small, head_dim, page_size, heads, seed):
    lengths = [0, 1, 15, 16, 17, 40, 64] if small else [0, 1, 15, 16, 17, 300, 1000, 2048]
    kv_heads = heads[1]
    cfg = dict(page_size=page_size, kv_heads=kv_heads, head_dim=head_dim, dtype=BF16)
    pages_per_seq = -(-max(lengths) // page_size) + 1
    k, v, table, lens = make_cache(np.random.default_rng(seed), lengths, pages_per_seq, cfg,
                                   poison=True)
    return lengths, k, v, table, lens


def paged_decode(small, interpret, head_dim, page_size, heads):
    lengths, k, v, table, lens = _paged_inputs(small, head_dim, page_size, heads, 1)
    q = _normal(8, (len(lengths), heads[0], head_dim))
    out = jax.jit(lambda *a: paged_attention_tpu(*a, interpret=interpret))(q, k, v, table, lens)
    ref = _reference(paged_attention_reference, *_fp32(q, k, v), table, lens)
    return [("out", out, ref, PAGED_TOL)]


def ragged(small, interpret, head_dim, page_size, heads):
    """Chunks of every length class (0, 1, < page, = page, > page), three rows past the end."""
    _, k, v, table, lens = _paged_inputs(small, head_dim, page_size, heads, 2)
    q_lens = [0, 1, 15, 16, 1, 33, 7] if small else [0, 1, 15, 16, 1, 300, 7, 513]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = _normal(9, (int(cu[-1]) + 3, heads[0], head_dim))
    out = jax.jit(lambda *a: ragged_paged_attention_tpu(*a, interpret=interpret))(
        q, k, v, table, lens, cu)
    ref = _reference(ragged_paged_attention_reference, *_fp32(q, k, v), table, lens, cu)
    return [("out", out, ref, PAGED_TOL)]


def lora(small, interpret, kind):
    """37 adapters of ranks 16 and 64 stacked at 64 (zero-padded), index -1 among them."""
    cfg = dict(in_dim=256, out_dim=128, ranks=(16, 32)) if small else dict(
        in_dim=4096, out_dim=4096, ranks=(16, 64))
    num_tokens, rng = (40 if small else 300), np.random.default_rng(3)
    a, b, scales = make_adapters(jax.random.key(10), 37, cfg, BF16)
    x, y = make_activations(jax.random.key(11), num_tokens, cfg, BF16)
    if kind == "bgmv":
        routing = (jnp.asarray(rng.integers(-1, 37, num_tokens), jnp.int32),)
        kernel, reference = bgmv_tpu, bgmv_reference
    else:  # 7 segments; the last 5 tokens belong to none
        cuts = np.sort(rng.choice(np.arange(1, num_tokens - 5), 6, replace=False))
        routing = (jnp.asarray(np.concatenate([[0], cuts, [num_tokens - 5]]), jnp.int32),
                   jnp.asarray(rng.integers(-1, 37, 7), jnp.int32))
        kernel, reference = sgmv_tpu, sgmv_reference
    out = kernel(y, x, a, b, *routing, scales, interpret=interpret)
    ref = _reference(reference, *_fp32(y, x, a, b), *routing, scales)
    return [("y", out, ref, LORA_TOL)]


def ring(small, interpret):
    """Causal GQA over every local device against dense attention on the whole sequence."""
    devices = jax.devices()
    per_device = 12 if small else 1000  # pads to the blocks in every shard
    blocks = DRY_RING_BLOCKS if small else {}
    batch, q_heads, kv_heads, head_dim = 1, 4, 2, 128
    tokens = per_device * len(devices)
    q = _normal(12, (batch, tokens, q_heads, head_dim))
    k, v = (_normal(i, (batch, tokens, kv_heads, head_dim)) for i in (13, 14))
    rows = P(None, "ring")
    fn = jax.jit(jax.shard_map(
        lambda q, k, v: ring_attention_tpu(q, k, v, axis_name="ring", causal=True,
                                           interpret=interpret, **blocks),
        mesh=Mesh(np.array(devices), ("ring",)), in_specs=(rows, rows, rows),
        out_specs=(rows, P(None, None, "ring"))))
    out, lse = fn(q, k, v)
    ref_out, ref_lse = _reference(flash_attention_reference, *_fp32(q, k, v), causal=True)
    return [("out", out, ref_out, ATTENTION_TOL), ("lse", lse, ref_lse, LSE_TOL)]


def cases():
    """(name, fn(small, interpret) -> [(label, got, want, tol)]) for every kernel."""
    case = lambda fn, **kw: lambda small, interpret: fn(small, interpret, **kw)
    found = [
        ("flash fwd causal gqa d128", flash_forward),
        ("flash fwd+bwd segments d64", flash_backward),
        ("paged decode h8/2 d128 p16", case(paged_decode, head_dim=128, page_size=16, heads=(8, 2))),
        ("paged decode h9/3 d64 p32", case(paged_decode, head_dim=64, page_size=32, heads=(9, 3))),
        ("ragged h8/2 d128 p16", case(ragged, head_dim=128, page_size=16, heads=(8, 2))),
        ("ragged h9/3 d64 p32", case(ragged, head_dim=64, page_size=32, heads=(9, 3))),
        ("bgmv r16/64 stacked, index -1", case(lora, kind="bgmv")),
        ("sgmv r16/64 stacked, adapter -1", case(lora, kind="sgmv")),
    ]
    if len(jax.devices()) >= 2:
        found.append((f"ring {len(jax.devices())} devices causal h4/2 d128", ring))
    return found


def run_checks(small, interpret):
    """Prints one [check] line per case; True when every case passed."""
    if len(jax.devices()) < 2:
        print("[skip] ring attention: needs >= 2 devices, found 1", flush=True)
    all_pass = True
    for name, case in cases():
        try:
            ok, errors = _compare(case(small, interpret))
            detail = "  ".join(f"{label} {err:.1e}" for label, err in errors.items())
            print(f"[check] {name:<34} max abs err: {detail}  {'PASS' if ok else 'FAIL'}",
                  flush=True)
        except Exception as exc:
            ok = False
            print(f"[check] {name:<34} ERROR {type(exc).__name__}: {str(exc)[:300]}  FAIL",
                  flush=True)
            traceback.print_exc(limit=4)
        all_pass &= ok
    return all_pass
