"""A prompt prefilled with its sequence split over the mesh, then decoded as usual, gives the same
greedy tokens (and logits) as prefill and decode on one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.llm import LLM
from sharding.mesh import MeshConfig, build_mesh, shard_params
from sharding.sp_prefill import sp_prefill

CFG = LLMConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)
# float32: the sharded prefill only reorders sums; a wrong mask or misplaced page is O(1) off.
TOL = dict(rtol=5e-5, atol=5e-5)
NEW_TOKENS = 4


@functools.partial(jax.jit, static_argnames=("graphdef",))
def decode(graphdef, state, token, cache):
    return functional.decode_step(graphdef, state, token, cache, attention=dense_attention)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill(graphdef, state, tokens, lengths, cache):
    return functional.extend(graphdef, state, tokens, lengths, cache, attention=dense_attention)


def greedy(graphdef, state, logits, cache):
    out, all_logits = [], [logits]
    for _ in range(NEW_TOKENS):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
        logits, cache = decode(graphdef, state, token, cache)
        all_logits.append(logits)
    return np.stack(out, 1), all_logits


@pytest.mark.parametrize("mesh_config,layout", [(MeshConfig(fsdp=2, sequence=4), "zigzag"),
                                                (MeshConfig(fsdp=2, sequence=2, sequence_a2a=2), "contiguous")])
def test_sp_prefill_then_decode_matches_one_device(mesh_config, layout):
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(9)))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 32)), jnp.int32)
    lengths = jnp.asarray([29, 32], jnp.int32)  # row 0 is padded: its padding must not reach the cache
    logits, cache = prefill(graphdef, state, tokens, lengths, contiguous_cache(CFG, 2, 48, page_size=8))
    want_tokens, want_logits = greedy(graphdef, state, logits, cache)

    mesh = build_mesh(mesh_config)
    logits, cache = sp_prefill(graphdef, shard_params(state, mesh), tokens, lengths,
                               contiguous_cache(CFG, 2, 48, page_size=8), mesh=mesh, layout=layout,
                               implementation="reference")
    got_tokens, got_logits = greedy(graphdef, state, logits, cache)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    for g, w in zip(got_logits, want_logits):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


def test_prompt_longer_than_the_cache_is_refused():
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(9)))
    mesh = build_mesh(MeshConfig(fsdp=2, sequence=4))
    with pytest.raises(ValueError, match="do not fit a cache of 16"):
        sp_prefill(graphdef, state, jnp.ones((2, 32), jnp.int32), jnp.asarray([32, 32], jnp.int32),
                   contiguous_cache(CFG, 2, 16, page_size=8), mesh=mesh)
