"""Every Mosaic TPU kernel, and the model that calls them, compiled by libtpu for each TPU generation.

No TPU is needed: `pallas_kernels.tpu_aot` compiles against a described slice (see its
docstring). A kernel that passes here got through Mosaic's layout inference and tiling for that
chip; whether it is fast or numerically right on the chip is not shown here (the kernel tests run
the same kernels in the TPU interpreter against their references).

    JAX_PLATFORMS=cpu PYTHONPATH=<dir with libtpu> python benchmarks/tpu_compile_check.py
    ... --quick      one generation, small shapes (the test suite runs this)

Prints one table: case, generation, result, compile seconds. Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jvila.config import LLMConfig  # noqa: E402
from jvila.models import functional  # noqa: E402
from jvila.models.kernel_attention import KernelAttention  # noqa: E402
from jvila.models.kv_cache import KVCache  # noqa: E402
from jvila.models.params import abstract_model  # noqa: E402
from pallas_kernels.flash_attention_tpu import flash_attention_tpu  # noqa: E402
from pallas_kernels.lora_tpu import bgmv_tpu, sgmv_tpu  # noqa: E402
from pallas_kernels.paged_attention_tpu import paged_attention_tpu  # noqa: E402
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu  # noqa: E402
from pallas_kernels.ring_attention_tpu import ring_attention_tpu  # noqa: E402
from pallas_kernels.tpu_aot import TOPOLOGIES, compile_for_tpu, tpu_devices, tpu_mesh  # noqa: E402
from sharding.rules import logical_to_spec, make_mesh  # noqa: E402

BF16 = jnp.bfloat16


class Case(NamedTuple):
    name: str
    build: Callable  # mesh -> (fn, args)
    mesh_axes: dict | None = None  # sizes for sharding.rules.make_mesh; None = one chip


def _sds(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _flash_case(name, batch, length, q_heads, kv_heads, head_dim, *, causal=True, segments=False, grad=False):
    def build(mesh):
        q = _sds((batch, length, q_heads, head_dim))
        kv = _sds((batch, length, kv_heads, head_dim))
        seg = _sds((batch, length), jnp.int32)

        def attend(q, k, v, seg):
            ids = seg if segments else None
            return flash_attention_tpu(q, k, v, causal=causal, q_segment_ids=ids, kv_segment_ids=ids)

        if not grad:
            return attend, (q, kv, kv, seg)

        def loss(q, k, v, seg):
            out, lse = attend(q, k, v, seg)
            # Both outputs enter the loss, so neither the forward kernel nor lse's cotangent is dead.
            return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

        return jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv, seg)

    return Case(name, build)


def _paged_case(name, num_seqs, context, q_heads, kv_heads, head_dim, page_size):
    def build(mesh):
        pages_per_seq = -(-context // page_size)
        pool = _sds((num_seqs * pages_per_seq, page_size, kv_heads, head_dim))
        args = (_sds((num_seqs, q_heads, head_dim)), pool, pool,
                _sds((num_seqs, pages_per_seq), jnp.int32), _sds((num_seqs,), jnp.int32))
        return paged_attention_tpu, args

    return Case(name, build)


def _ragged_case(name, num_seqs, capacity, num_tokens, q_heads, kv_heads, head_dim, page_size):
    def build(mesh):
        pages_per_seq = -(-capacity // page_size)
        pool = _sds((num_seqs * pages_per_seq, page_size, kv_heads, head_dim))
        args = (_sds((num_tokens, q_heads, head_dim)), pool, pool,
                _sds((num_seqs, pages_per_seq), jnp.int32), _sds((num_seqs,), jnp.int32),
                _sds((num_seqs + 1,), jnp.int32))
        return ragged_paged_attention_tpu, args

    return Case(name, build)


def _lora_case(name, num_tokens, dim, max_rank, num_adapters, *, segments=None):
    """BGMV over `num_tokens` (one adapter index each), or SGMV over `segments` segments."""

    def build(mesh):
        stacked = (_sds((num_tokens, dim)), _sds((num_tokens, dim)), _sds((num_adapters, dim, max_rank)),
                   _sds((num_adapters, max_rank, dim)))
        scales = _sds((num_adapters,), jnp.float32)
        if segments is None:
            return bgmv_tpu, (*stacked, _sds((num_tokens,), jnp.int32), scales)
        return sgmv_tpu, (*stacked, _sds((segments + 1,), jnp.int32), _sds((segments,), jnp.int32), scales)

    return Case(name, build)


def _ring_case(name, batch, length, q_heads, kv_heads, head_dim, ring, *, causal=True, grad=False):
    """The fused ring kernel under shard_map: each of `ring` chips holds length / ring tokens;
    `grad` adds its backward (a ppermute ring of Mosaic flash forward/backward calls)."""

    def build(mesh):
        spec = PartitionSpec(None, "sequence", None, None)
        q = _sharded(mesh, (batch, length, q_heads, head_dim), BF16, (None, "sequence", None, None))
        kv = _sharded(mesh, (batch, length, kv_heads, head_dim), BF16, (None, "sequence", None, None))
        attend = jax.shard_map(
            lambda q, k, v: ring_attention_tpu(q, k, v, axis_name="sequence", causal=causal),
            mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, PartitionSpec(None, None, "sequence")))
        if not grad:
            return attend, (q, kv, kv)

        def loss(q, k, v):
            out, lse = attend(q, k, v)
            return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

        return jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv)

    return Case(name, build, dict(fsdp=1, sequence=ring))


def _sharded(mesh, shape, dtype, names):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(names, shape, mesh)))


def _abstract_state(cfg, mesh):
    """The model's parameters as shape-only arrays placed by the logical-axis rule table."""
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=BF16, compute_dtype=BF16))

    def place(var):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return var.replace(_sharded(mesh, value.shape, value.dtype, names))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _model_train_case(name, cfg, batch, length, mesh_axes):
    """loss + gradient of the whole model, flash attention through the Mosaic kernel."""

    def build(mesh):
        graphdef, state = _abstract_state(cfg, mesh)
        attention = KernelAttention("pallas_tpu", mesh=mesh)
        tokens = _sharded(mesh, (batch, length), jnp.int32, ("batch", None))
        weights = _sharded(mesh, (batch, length), jnp.float32, ("batch", None))

        def step(state, tokens, targets, weights):
            return jax.value_and_grad(lambda s: functional.loss(graphdef, s, tokens, targets, weights,
                                                                attention=attention))(state)

        return step, (state, tokens, tokens, weights)

    return Case(name, build, mesh_axes)


def _model_cache_case(name, cfg, batch, context, page_size, chunk, mesh_axes):
    """One `extend` of the whole model over the paged cache: chunk 1 is a decode step (paged
    attention), a longer chunk is chunked prefill (ragged paged attention)."""

    def build(mesh):
        graphdef, state = _abstract_state(cfg, mesh)
        attention = KernelAttention("pallas_tpu", mesh=mesh)
        pages_per_seq = context // page_size
        pool = _sharded(mesh, (batch * pages_per_seq, page_size, cfg.num_kv_heads, cfg.head_dim), BF16,
                        (None, None, "kv_heads", None))
        cache = KVCache(k_pages=(pool,) * cfg.num_layers, v_pages=(pool,) * cfg.num_layers,
                        page_table=_sharded(mesh, (batch, pages_per_seq), jnp.int32, ("batch", None)),
                        lengths=_sharded(mesh, (batch,), jnp.int32, ("batch",)))
        tokens = _sharded(mesh, (batch, chunk), jnp.int32, ("batch", None))
        num_new = _sharded(mesh, (batch,), jnp.int32, ("batch",))

        def step(state, tokens, num_new, cache):
            return functional.extend(graphdef, state, tokens, num_new, cache, attention=attention)

        return step, (state, tokens, num_new, cache)

    return Case(name, build, mesh_axes)


# Two layers of a 1B-class decoder: every kind of layer, in a fraction of the compile time.
MODEL_1B = LLMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=2, num_heads=32,
                     num_kv_heads=8, head_dim=64)
# head_dim 64, as in SmolLM2 and Llama 3.2 1B: paged kernels pack kv heads in pairs.
MODEL_TINY = LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=8,
                       num_kv_heads=4, head_dim=64)


def model_cases(quick: bool) -> list[Case]:
    if quick:
        return [
            _model_train_case("model train step fsdp2 x tensor2 (tiny)", MODEL_TINY, 4, 256,
                              dict(fsdp=2, tensor=2)),
            _model_cache_case("model decode step fsdp2 x tensor2 (tiny)", MODEL_TINY, 4, 512, 16, 1,
                              dict(fsdp=2, tensor=2)),
            _model_cache_case("model prefill chunk fsdp2 x tensor2 (tiny)", MODEL_TINY, 4, 512, 16, 64,
                              dict(fsdp=2, tensor=2)),
        ]
    return [
        _model_train_case("model train step fsdp4, 1B-shape x2 layers, b8 s2048", MODEL_1B, 8, 2048,
                          dict(fsdp=4)),
        _model_train_case("model train step fsdp2 x tensor2, same", MODEL_1B, 8, 2048, dict(fsdp=2, tensor=2)),
        _model_cache_case("model decode step tensor4, 1B-shape, b32 ctx4096 p16", MODEL_1B, 32, 4096, 16, 1,
                          dict(fsdp=1, tensor=4)),
        _model_cache_case("model prefill chunk 512 tensor4, same", MODEL_1B, 32, 4096, 16, 512,
                          dict(fsdp=1, tensor=4)),
    ]


def kernel_cases(quick: bool) -> list[Case]:
    if quick:
        return [
            _flash_case("flash fwd causal b1 s256 h4/2 d128", 1, 256, 4, 2, 128),
            _flash_case("flash fwd+bwd segments b1 s256 h4/2 d128", 1, 256, 4, 2, 128, segments=True, grad=True),
            _paged_case("paged decode 2x512 h8/2 d128 p16", 2, 512, 8, 2, 128, 16),
            _paged_case("paged decode 2x512 h9/3 d64 p16 (SmolLM2 heads)", 2, 512, 9, 3, 64, 16),
            _ragged_case("ragged 2x512 cap, 300 tokens h8/2 d128 p16", 2, 512, 300, 8, 2, 128, 16),
            _lora_case("bgmv 8 tokens 512->512 r16, 4 adapters", 8, 512, 16, 4),
            _lora_case("sgmv 300 tokens 512->512 r16, 3 segments", 300, 512, 16, 4, segments=3),
            _ring_case("ring 4 chips x 256 tokens h4/2 d128", 1, 1024, 4, 2, 128, 4),
            _ring_case("ring fwd+bwd 4 chips x 256 tokens h4/2 d128", 1, 1024, 4, 2, 128, 4, grad=True),
        ]
    return [
        _flash_case("flash fwd causal b2 s2048 h8/2 d128", 2, 2048, 8, 2, 128),
        _flash_case("flash fwd full b2 s2048 h8/8 d64", 2, 2048, 8, 8, 64, causal=False),
        _flash_case("flash fwd segments b2 s2048 h8/2 d128", 2, 2048, 8, 2, 128, segments=True),
        _flash_case("flash fwd+bwd causal b2 s2048 h8/2 d128", 2, 2048, 8, 2, 128, grad=True),
        _flash_case("flash fwd+bwd segments b2 s2048 h8/8 d64", 2, 2048, 8, 8, 64, segments=True, grad=True),
        _paged_case("paged decode 32x4096 h32/8 d128 p16", 32, 4096, 32, 8, 128, 16),
        _paged_case("paged decode 8x2048 h16/16 d128 p32", 8, 2048, 16, 16, 128, 32),
        _paged_case("paged decode 32x4096 h32/8 d64 p16", 32, 4096, 32, 8, 64, 16),
        _paged_case("paged decode 8x2048 h9/3 d64 p16 (SmolLM2 heads)", 8, 2048, 9, 3, 64, 16),
        _ragged_case("ragged 8x4096 cap, 8192 tokens h32/8 d128 p16", 8, 4096, 8192, 32, 8, 128, 16),
        _ragged_case("ragged 8x4096 cap, 8192 tokens h32/8 d128 p32", 8, 4096, 8192, 32, 8, 128, 32),
        _ragged_case("ragged 8x4096 cap, 8192 tokens h32/8 d64 p16", 8, 4096, 8192, 32, 8, 64, 16),
        _lora_case("bgmv 1 token 4096->4096 r64, 100 adapters", 1, 4096, 64, 100),
        _lora_case("bgmv 64 tokens 4096->4096 r16, 100 adapters", 64, 4096, 16, 100),
        _lora_case("bgmv 1024 tokens 4096->4096 r64, 100 adapters", 1024, 4096, 64, 100),
        _lora_case("sgmv 4096 tokens 4096->4096 r64, 8 segments", 4096, 4096, 64, 100, segments=8),
        _ring_case("ring 4 chips x 4096 tokens h32/8 d128 causal", 1, 16384, 32, 8, 128, 4),
        _ring_case("ring 4 chips x 4096 tokens h8/8 d128 full", 1, 16384, 8, 8, 128, 4, causal=False),
        _ring_case("ring fwd+bwd 4 chips x 4096 tokens h32/8 d128 causal", 1, 16384, 32, 8, 128, 4, grad=True),
    ]


def run(cases: list[Case], generations: list[str]) -> list[tuple[str, str, str, float]]:
    rows = []
    for generation in generations:
        for case in cases:
            start = time.perf_counter()
            try:
                if case.mesh_axes is None:
                    mesh = tpu_mesh(generation)
                else:
                    chips = math.prod(case.mesh_axes.values())
                    mesh = make_mesh(**case.mesh_axes, devices=tpu_devices(generation)[:chips])
                fn, args = case.build(mesh)
                compile_for_tpu(fn, *args, mesh=mesh)
                result = "ok"
            except Exception as error:  # report every failure, then fail at the end
                traceback.print_exc()
                result = f"FAIL {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            rows.append((case.name, generation, result, time.perf_counter() - start))
    return rows


def print_table(rows) -> None:
    width = max(len(name) for name, *_ in rows)
    print(f"\n{'case':<{width}}  gen   compile s  result")
    for name, generation, result, seconds in rows:
        print(f"{name:<{width}}  {generation:<4}  {seconds:9.1f}  {result}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one generation, small shapes")
    parser.add_argument("--generations", default=",".join(TOPOLOGIES),
                        help="comma-separated, from " + ", ".join(TOPOLOGIES))
    args = parser.parse_args(argv)
    generations = ["v5e"] if args.quick else args.generations.split(",")
    rows = run(kernel_cases(args.quick) + model_cases(args.quick), generations)
    print_table(rows)
    failed = [row for row in rows if row[2] != "ok"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled for TPU")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
