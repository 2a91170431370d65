"""One of two processes of tests/sharding/test_multihost.py: a sharded training step over both
processes' devices (2 x 4 CPU devices, gloo on loopback) against this process's one-device step."""

import sys

import jax
import numpy as np

from sharding.multihost import initialize_from_environment

assert initialize_from_environment()
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kernel_attention import KernelAttention
from jvila.models.llm import LLM
from sharding.load_balance import zigzag_batch
from sharding.mesh import MeshConfig, build_mesh, shard_batch, shard_params

CFG = LLMConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8)
# float32; the sharded step only reorders sums (matmul partials, attention partials merged by lse).
TOL = dict(rtol=2e-5, atol=2e-6)


def step(graphdef, attention):
    def value_and_grad(state, batch):
        return jax.value_and_grad(functional.loss, argnums=1)(
            graphdef, state, batch["tokens"], batch["targets"], batch["weights"], attention=attention,
            positions=batch["positions"], segment_ids=batch["segment_ids"])

    return jax.jit(value_and_grad)


def main():
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(3)))  # same seed: same weights in both processes
    rng = np.random.default_rng(0)
    seq = 32
    segments = (np.arange(seq)[None] >= np.array([[11], [20]])).astype(np.int32)
    batch = dict(tokens=rng.integers(0, CFG.vocab_size, (2, seq), dtype=np.int32),
                 targets=rng.integers(0, CFG.vocab_size, (2, seq), dtype=np.int32),
                 weights=(rng.random((2, seq)) > 0.2).astype(np.float32), segment_ids=segments,
                 positions=np.where(segments == 0, np.arange(seq), np.arange(seq) - np.array([[11], [20]]))
                 .astype(np.int32))
    want_loss, want_grads = step(graphdef, dense_attention)(state, batch)

    # Ulysses x tensor inside each process (its 4 devices), the ring across the two processes.
    mesh = build_mesh(MeshConfig(fsdp=1, sequence=2, sequence_a2a=2, tensor=2))
    grid = np.asarray(mesh.devices)  # [data, fsdp, sequence, sequence_a2a, tensor]
    for ring in range(2):  # each all-to-all group lies inside one process; the ring spans both
        assert len({d.process_index for d in grid[:, :, ring].ravel()}) == 1
    assert {d.process_index for d in grid[0, 0, :, 0, 0]} == {0, 1}
    batch = zigzag_batch({k: np.asarray(v) for k, v in batch.items()}, 2, shard_multiple=2)
    batch = shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    host_state = jax.tree.map(np.asarray, state)
    attention = KernelAttention("reference", mesh=mesh, sequence_layout="zigzag")
    got_loss, got_grads = step(graphdef, attention)(shard_params(host_state, mesh), batch)

    np.testing.assert_allclose(np.asarray(got_loss.addressable_shards[0].data), np.asarray(want_loss), **TOL)
    checked = 0
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        for shard in got.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), np.asarray(want)[shard.index], **TOL)
            checked += 1
    print(f"process {jax.process_index()}: loss {float(want_loss):.6f} and {checked} gradient shards match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
