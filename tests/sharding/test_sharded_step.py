"""Loss and gradients of a training step sharded every way the mesh allows equal one device's.

The model runs through KernelAttention, which picks ring, Ulysses or 2D attention from the mesh;
parameters are placed by the logical-axis rules; packed sequences (segment ids, positions that
restart) in every batch. Layouts: contiguous, zigzag (the batch permuted once) and LightSeq's
balanced schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kernel_attention import KernelAttention
from jvila.models.llm import LLM
from sharding.load_balance import zigzag_batch
from sharding.mesh import MeshConfig, build_mesh, shard_batch, shard_params

GQA = LLMConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8)
MQA = LLMConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=1,
                head_dim=8)
# float32; the sharded step sums matmul partials and attention partials in another order.
TOL = dict(rtol=2e-5, atol=2e-6)


def packed_batch(seed, cfg, rows=2, seq=32):
    rng = np.random.default_rng(seed)
    cut = rng.integers(5, seq - 5, rows)  # two packed sequences per row
    idx = np.arange(seq)[None]
    segments = (idx >= cut[:, None]).astype(np.int32)
    positions = np.where(segments == 0, idx, idx - cut[:, None]).astype(np.int32)
    weights = (rng.random((rows, seq)) > 0.2).astype(np.float32)
    return {name: jnp.asarray(value) for name, value in dict(
        tokens=rng.integers(0, cfg.vocab_size, (rows, seq), dtype=np.int32),
        targets=rng.integers(0, cfg.vocab_size, (rows, seq), dtype=np.int32),
        weights=weights, positions=positions, segment_ids=segments).items()}


def step(graphdef, attention):
    def value_and_grad(state, batch):
        return jax.value_and_grad(functional.loss, argnums=1)(
            graphdef, state, batch["tokens"], batch["targets"], batch["weights"], attention=attention,
            positions=batch["positions"], segment_ids=batch["segment_ids"])

    return value_and_grad


CASES = {  # model, mesh, layout, the collectives sequence parallelism must use
    "fsdp x tensor": (GQA, MeshConfig(fsdp=4, tensor=2), "contiguous", ()),
    "fsdp x ring": (GQA, MeshConfig(fsdp=2, sequence=4), "contiguous", ("ppermute",)),
    "ulysses (MQA)": (MQA, MeshConfig(fsdp=2, sequence_a2a=4), "contiguous", ("all_to_all",)),
    "2D (LightSeq ring) x tensor": (GQA, MeshConfig(fsdp=1, sequence=2, sequence_a2a=2, tensor=2), "lightseq",
                                    ("ppermute", "all_to_all")),
    "fsdp x zigzag ring (MQA)": (MQA, MeshConfig(fsdp=2, sequence=4), "zigzag", ("ppermute",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_equals_one_device(case):
    cfg, mesh_config, layout, collectives = CASES[case]
    graphdef, state = nnx.split(LLM(cfg, rngs=nnx.Rngs(3)))
    batch = packed_batch(len(case), cfg)
    want_loss, want_grads = jax.jit(step(graphdef, dense_attention))(state, batch)

    mesh = build_mesh(mesh_config)
    if layout == "zigzag":
        batch = zigzag_batch(batch, mesh.shape["sequence"], shard_multiple=mesh.shape["sequence_a2a"])
    attention = KernelAttention("reference", mesh=mesh, sequence_layout=layout)
    sharded_step = jax.jit(step(graphdef, attention))
    state, batch = shard_params(state, mesh), shard_batch(batch, mesh)
    jaxpr = str(jax.make_jaxpr(sharded_step)(state, batch))
    for name in ("ppermute", "all_to_all"):
        assert (name in jaxpr) == (name in collectives), name
    got_loss, got_grads = sharded_step(state, batch)
    np.testing.assert_allclose(float(got_loss), float(want_loss), **TOL)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path), **TOL)
