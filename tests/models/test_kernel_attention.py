"""The whole model with the Pallas kernels (interpret mode) against the dense reference attention."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.generate import generate
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kernel_attention import KernelAttention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.llm import LLM
from sharding.rules import make_mesh, shard_state

# head_dim and page size are powers of two, as the Triton-shaped kernels require.
CFG = LLMConfig(vocab_size=101, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=1,
                head_dim=16)
KERNELS = KernelAttention("pallas_interpret")
# float32 on both sides; kernels use online softmax (different summation order) => rounding only.
TOL = 2e-5


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(11)))


def tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_flash_prefill_with_segments(split_model):
    graphdef, state = split_model
    toks = tokens((2, 45), 0)
    segments = jnp.asarray(np.repeat([[0] * 20 + [1] * 25], 2, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(20)) + list(range(25))], 2, axis=0), jnp.int32)
    want = functional.logits(graphdef, state, toks, attention=dense_attention, positions=positions,
                             segment_ids=segments)
    got = functional.logits(graphdef, state, toks, attention=KERNELS, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


def test_paged_chunks_and_decode(split_model):
    graphdef, state = split_model
    toks = np.asarray(tokens((3, 40), 1))
    caches = {name: contiguous_cache(CFG, 3, 48, page_size=8) for name in ("dense", "kernel")}
    consumed = np.zeros(3, int)
    for chunk in ([13, 0, 21], [1, 1, 1], [9, 17, 2], [1, 1, 1]):
        width = max(chunk)
        block = np.zeros((3, width), np.int32)
        for b, n in enumerate(chunk):
            block[b, :n] = toks[b, consumed[b] : consumed[b] + n]
        outs = {}
        for name, attention in (("dense", dense_attention), ("kernel", KERNELS)):
            outs[name], caches[name] = functional.extend(graphdef, state, jnp.asarray(block),
                                                         jnp.asarray(chunk, jnp.int32), caches[name],
                                                         attention=attention)
        consumed += chunk
        rows = np.asarray(chunk) > 0  # a row that took no tokens has no defined logits
        np.testing.assert_allclose(np.asarray(outs["kernel"])[rows], np.asarray(outs["dense"])[rows],
                                   rtol=TOL, atol=TOL)


def test_generation_is_unchanged(split_model):
    graphdef, state = split_model
    prompts = [list(np.asarray(tokens((n,), n))) for n in (5, 19)]
    want = generate(graphdef, state, prompts, max_new_tokens=6, page_size=8)
    assert generate(graphdef, state, prompts, max_new_tokens=6, page_size=8, attention=KERNELS) == want


# 4 query / 2 kv heads: both split over a 2-way tensor axis.
MESH_CFG = LLMConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("mesh_from", ["argument", "context"])
def test_kernels_on_a_mesh_match_one_device(mesh_from):
    # Pallas calls cannot be partitioned by XLA: KernelAttention must shard_map them over the
    # mesh (batch over data x fsdp, heads over tensor) and still compute what one device does.
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(LLM(MESH_CFG, rngs=nnx.Rngs(5)))
    toks = jnp.asarray(np.random.default_rng(3).integers(0, MESH_CFG.vocab_size, (4, 24)), jnp.int32)
    kernels = KernelAttention("pallas_interpret", mesh=mesh if mesh_from == "argument" else None)
    sharded = shard_state(state, mesh)

    def run(attention, state):
        cache = contiguous_cache(MESH_CFG, 4, 32, page_size=8)
        prefill = functional.logits(graphdef, state, toks, attention=attention)
        chunk, cache = functional.extend(graphdef, state, toks[:, :9], jnp.asarray([9, 4, 9, 1], jnp.int32),
                                         cache, attention=attention)
        step, _ = functional.decode_step(graphdef, state, toks[:, 9], cache, attention=attention)
        return prefill, chunk, step

    want = run(dense_attention, state)
    with jax.set_mesh(mesh) if mesh_from == "context" else contextlib.nullcontext():
        # Three kernel kinds (flash, ragged, decode) per layer, each under its own shard_map.
        jaxpr = str(jax.make_jaxpr(run, static_argnums=0)(kernels, sharded))
        assert jaxpr.count("shard_map[") == 3 * MESH_CFG.num_layers
        got = jax.jit(run, static_argnums=0)(kernels, sharded)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL)
