"""Parameters placed by the logical-axis table on 8 simulated devices compute what one device does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.llm import LLM
from sharding.rules import logical_to_spec, make_mesh, shard_state

CFG = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16)


def test_mesh_sizes_and_errors():
    assert dict(make_mesh(data=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_logical_names_map_to_mesh_axes():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh) == PartitionSpec("fsdp", "tensor", None)
    # 3 KV heads do not split 2 ways: that dimension stays replicated rather than failing.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == PartitionSpec("fsdp", None, None)
    assert logical_to_spec(("batch", None), (8, 5), mesh) == PartitionSpec(("data", "fsdp"), None)


def test_sharded_forward_matches_single_device():
    assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(7)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 24)), jnp.int32)
    want = functional.logits(graphdef, state, tokens, attention=dense_attention)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = shard_state(state, mesh)
    q_proj = sharded["layers"][0]["attn"]["q_proj"].get_value()
    assert q_proj.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    tokens = jax.device_put(tokens, NamedSharding(mesh, logical_to_spec(("batch", None), tokens.shape, mesh)))
    got = jax.jit(lambda s, t: functional.logits(graphdef, s, t, attention=dense_attention))(sharded, tokens)
    # Sharded matmuls sum partial products in another order: float32 rounding only.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
