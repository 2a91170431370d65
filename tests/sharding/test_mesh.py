"""Mesh construction from a config, node-aware layout, placement helpers and the replication check."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jvila.config import LLMConfig
from jvila.models.llm import LLM
from sharding.mesh import (
    MeshConfig,
    build_mesh,
    check_large_params_sharded,
    node_ordered_devices,
    shard_batch,
    shard_like_params,
    shard_params,
)

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int


def test_sizes_and_errors():
    mesh = build_mesh(MeshConfig(sequence=2, sequence_a2a=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 2, "sequence_a2a": 2, "tensor": 1}
    # The innermost axes hold neighbouring devices.
    assert [d.id for d in np.asarray(mesh.devices)[0, 0, 0, :, 0]] == [0, 1]
    with pytest.raises(ValueError, match="needs 6 devices"):
        build_mesh(MeshConfig(fsdp=3, sequence=2))
    with pytest.raises(ValueError, match="at most one"):
        build_mesh(MeshConfig(data=-1))
    with pytest.raises(ValueError, match="size 0"):
        build_mesh(MeshConfig(tensor=0))


def test_all_to_all_axis_kept_inside_a_node():
    # Two hosts of four devices, listed interleaved: the mesh regroups them by host.
    devices = [FakeDevice(i, i % 2) for i in range(8)]
    assert [d.process_index for d in node_ordered_devices(devices)] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="span 2 nodes.*ring axis 'sequence'"):
        build_mesh(MeshConfig(fsdp=1, sequence_a2a=8), devices=devices)
    six_per_node = [FakeDevice(i, i % 2) for i in range(12)]
    with pytest.raises(ValueError, match="neither fit evenly"):
        build_mesh(MeshConfig(fsdp=1, sequence=3, sequence_a2a=4), devices=six_per_node)


def test_params_optimizer_state_and_batch_placed():
    mesh = build_mesh(MeshConfig(fsdp=2, sequence=2, tensor=2))
    _, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(0)))
    params = shard_params(state, mesh)
    assert params["layers"][0]["attn"]["q_proj"].get_value().sharding.spec == PartitionSpec("fsdp", "tensor", None)
    values = nnx.to_pure_dict(params)
    opt_state = shard_like_params(optax.adam(1e-3).init(values), values, mesh)
    mu = opt_state[0].mu["layers"][0]["attn"]["q_proj"]
    assert mu.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert opt_state[0].count.sharding.is_fully_replicated
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)), jnp.int32)
    placed = shard_batch({"tokens": tokens, "segment_ids": None}, mesh)
    assert placed["tokens"].sharding.spec == PartitionSpec("fsdp", "sequence")
    with pytest.raises(ValueError, match="not divisible by the 2 sequence shards"):
        shard_batch({"tokens": tokens[:, :11]}, mesh)


def test_replicated_large_parameter_is_caught():
    mesh = build_mesh(MeshConfig(fsdp=4, tensor=2))
    _, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(0)))
    params = shard_params(state, mesh)
    check_large_params_sharded(params, mesh, min_bytes=1024)  # every large one is split
    # A rule table that forgets "embed" leaves the embedding whole on every device.
    rules = (("vocab", None), ("embed", None), ("mlp", ("tensor",)), ("q_heads", ("tensor",)),
             ("kv_heads", ("tensor",)))
    with pytest.raises(ValueError, match=r"\['embed'\].*replicated|replicated.*\['embed'\]"):
        check_large_params_sharded(shard_params(state, mesh, rules), mesh, min_bytes=1024)
