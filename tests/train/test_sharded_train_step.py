"""The train step on 8 simulated devices (FSDP x tensor) follows one device's loss curve.

Parameters and optimizer state placed by the logical-axis rules (`place_train_state`), batches by
`shard_batch`; after every step each leaf keeps the placement it came with. (Gradient accumulation
is checked against one big batch on one device in test_train_step.py.)
"""

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jvila.config import LLMConfig
from jvila.models.attention import dense_attention
from jvila.models.nvila import abstract_nvila, nvila_from_params
from jvila.models.params import abstract_model, flat_params, model_from_params
from jvila.train import optimizer as opt
from jvila.train.step import full_params, init_train_state, make_train_step, place_train_state
from sharding.mesh import MeshConfig, build_mesh, check_large_params_sharded, shard_batch

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8, family="qwen2", qkv_bias=True)


def batches(count, rows=8, seq=24):
    rng = np.random.default_rng(5)
    out = []
    for _ in range(count):
        idx = np.arange(seq)[None]
        cut = rng.integers(5, seq - 5, rows)[:, None]
        segments = np.where(idx < cut, 1, 2).astype(np.int32)
        out.append(dict(tokens=rng.integers(0, CFG.vocab_size, (rows, seq), dtype=np.int32),
                        targets=rng.integers(0, CFG.vocab_size, (rows, seq), dtype=np.int32),
                        weights=(rng.random((rows, seq)) > 0.25).astype(np.float32),
                        positions=np.where(segments == 1, idx, idx - cut).astype(np.int32), segment_ids=segments))
    return out


def run(mesh=None, grad_accum=1, steps=3):
    rng = np.random.default_rng(0)
    shapes = flat_params(abstract_model(CFG))
    model = model_from_params(CFG, {k: 0.05 * rng.normal(size=v.shape) for k, v in shapes.items()})
    graphdef, params = nnx.split(model)
    mask = opt.trainable_mask(params, ["layers.*", "embed", "lm_head"])  # the final norm frozen
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.3, weight_decay=0.01),
                                    params, mask, steps)
    state = init_train_state(graphdef, params, optimizer, mask)
    if mesh is not None:
        state = place_train_state(state, mesh)
    step = make_train_step(graphdef, optimizer, attention=dense_attention, grad_accum=grad_accum)
    placements = [getattr(x, "sharding", None) for x in jax.tree.leaves(state)]
    losses = []
    for batch in batches(steps):
        state, metrics = step(state, batch if mesh is None else shard_batch(batch, mesh), jax.random.key(0))
        losses.append([float(metrics[k]) for k in ("loss", "grad_norm", "learning_rate", "tokens")])
    # Placed inputs look like the step's outputs: one compile for all steps.
    assert step.compilations() == 1
    return state, np.array(losses), placements


def test_fsdp_x_tensor_on_8_devices_equals_one_device():
    assert jax.device_count() == 8
    want_state, want, _ = run()
    mesh = build_mesh(MeshConfig(fsdp=4, tensor=2))
    state, got, placements = run(mesh)
    # float32 AdamW over 3 steps; sharded matmuls sum their partial products in another order, and
    # Adam's normalisation turns those rounding differences into small parameter differences.
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full_params(state)),
                            jax.tree.leaves(full_params(want_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # Placement: matrices split over fsdp and tensor, kept so by the step; Adam's moments placed like their params.
    check_large_params_sharded(state.trainable, mesh, min_bytes=1024)
    for x, placed in zip(jax.tree.leaves(state), placements, strict=True):
        assert x.sharding.is_equivalent_to(placed, x.ndim), (x.sharding, placed)
    q = state.trainable["layers"][0]["attn"]["q_proj"].get_value()
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None)), 3)
    mu = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")).mu
    assert mu["layers"][0]["attn"]["q_proj"].get_value().sharding == q.sharding



def test_nvila_step_on_fsdp_x_tensor_equals_one_device():
    # NVILA looks up the media end token's embedding by a constant id. With the table's 68 vocab rows
    # split over the tensor axis, XLA's partitioned gradient of that lookup once also landed on row
    # 34 (another shard's first row): Adam then moved a row with no gradient by the learning rate.
    from tests.train.test_train_step import NVILA_CFG, nvila_batch, random_params

    cfg = dataclasses.replace(NVILA_CFG, llm=dataclasses.replace(NVILA_CFG.llm, vocab_size=68))
    graphdef, params = nnx.split(nvila_from_params(cfg, random_params(flat_params(abstract_nvila(cfg)), 7)))
    mask = opt.trainable_mask(params, "all")
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), params, mask, 2)
    batches = [nvila_batch(8, rows=4), nvila_batch(9, rows=4)]

    def run_nvila(mesh):
        state = init_train_state(graphdef, jax.tree.map(jax.numpy.copy, params), optimizer, mask)
        if mesh is not None:
            state = place_train_state(state, mesh)
        step = make_train_step(graphdef, optimizer, attention=dense_attention)
        norms = []
        for batch in batches:
            state, metrics = step(state, batch if mesh is None else shard_batch(batch, mesh), jax.random.key(0))
            norms.append(float(metrics["grad_norm"]))
        return flat_params(full_params(state)), norms

    want, want_norms = run_nvila(None)
    got, got_norms = run_nvila(build_mesh(MeshConfig(fsdp=4, tensor=2)))
    np.testing.assert_allclose(got_norms, want_norms, rtol=2e-5)  # float32 sums in another order
    # Two Adam steps of lr 1e-2: a wrong gradient moves a weight by ~1e-2; rounding differences,
    # which Adam's normalisation magnifies where a gradient is near zero (biases), stay far below.
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-4, err_msg=name)
