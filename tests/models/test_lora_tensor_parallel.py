"""Stacked adapters under 2-way tensor parallelism on 8 simulated devices compute what one device does."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from lora_fixtures import greedy_packed, random_adapter

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.llm import LLM
from jvila.models.lora import TARGET_MODULES, partition_specs, shard_lora, stack_adapters
from sharding.rules import make_mesh, shard_state

# 4 query / 2 KV heads and an MLP width that split 2 ways; hidden 48 splits over fsdp 2.
CFG = LLMConfig(vocab_size=83, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, qkv_bias=True)
RANKS = (8, 16, 24, 32, 40, 48, 56, 64)

extend_packed = jax.jit(functional.extend_packed, static_argnames=("graphdef", "attention"))


def test_eight_adapters_under_tensor_parallelism_match_one_device():
    assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices
    rng = np.random.default_rng()
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    adapters = [random_adapter(CFG, r, TARGET_MODULES if i % 2 == 0 else ("q_proj", "v_proj", "down_proj"), rng,
                               alpha=float(r), std=0.5 / np.sqrt(r)) for i, r in enumerate(RANKS)]
    lora = stack_adapters(adapters, max_rank=64, base_config=CFG)
    row_adapters = np.concatenate([rng.permutation(8), [-1]]).astype(np.int32)
    prompts = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in rng.integers(3, 12, 9)]
    want_tokens, want_logits = greedy_packed(extend_packed, graphdef, state, CFG, prompts, 4, 96, lora, row_adapters)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_lora = shard_lora(lora, CFG, mesh)
    layer = sharded_lora.layers[1]
    # Column-parallel: B splits on out with the heads / MLP columns, A whole; row-parallel: A splits on in.
    for module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert layer[module].a.sharding.spec == P(None, None, None), module
        assert layer[module].b.sharding.spec == P(None, None, "tensor"), module
    for module in ("o_proj", "down_proj"):
        assert layer[module].a.sharding.spec == P(None, "tensor", None), module
        assert layer[module].b.sharding.spec == P(None, None, None), module
    # 3 KV heads would not split 2 ways: the adapter then stays whole, as the base weight does.
    odd = CFG.__class__(**{**CFG.__dict__, "num_heads": 3, "num_kv_heads": 3})
    odd_lora = stack_adapters([random_adapter(odd, 4, ("k_proj",), rng)], max_rank=4)
    assert partition_specs(odd_lora, odd, mesh).layers[0]["k_proj"].b == P(None, None, None)

    got_tokens, got_logits = greedy_packed(extend_packed, graphdef, shard_state(state, mesh), CFG, prompts, 4, 96,
                                           sharded_lora, row_adapters)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    # Sharded matmuls sum partial products in another order: float32 rounding only (seen ~1e-6 of the largest).
    assert np.abs(got_logits - want_logits).max() < 1e-4 * np.abs(want_logits).max()
