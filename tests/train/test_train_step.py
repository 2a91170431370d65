"""The train step: stage freezing, gradient accumulation, bf16 compute, remat, the NVILA loss, LoRA-only.

Tiny random models (one or two layers, sizes that divide nothing in particular), packed rows with
two segments, random weights: every check compares against an independent computation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.params import abstract_model, flat_params, model_from_params
from jvila.models.lora import LoraConfig, init_adapter
from jvila.models.nvila import abstract_nvila, embed_prompt, image_blocks, image_token_count, nvila_from_params
from jvila.train import forward, optimizer as opt
from jvila.train.step import full_params, init_train_state, lora_weights, make_train_step
from jvila.vision_config import NVILAConfig, SiglipConfig

# One layer keeps compiles short (each test compiles a step or two); the remat test uses two.
LLM_CFG = LLMConfig(vocab_size=67, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=3, num_kv_heads=1,
                    head_dim=8, family="qwen2", qkv_bias=True)
IMAGE_ID, NEWLINE_ID = 60, 5
# 28 px tiles in 7 px patches: 4x4 maps, 2x2 tokens after the projector's 2x2 spatial-to-channel step.
NVILA_CFG = NVILAConfig(
    llm=LLM_CFG, vision=SiglipConfig(hidden_size=12, intermediate_size=20, num_layers=1, num_heads=2, image_size=28,
                                     patch_size=7),
    image_aspect_ratio="resize", dynamic_s2=False, select_layer=-1, image_token_id=IMAGE_ID, video_token_id=61,
    media_end_token_ids=(NEWLINE_ID,))
# The tower's post_norm is never run by NVILA (features come before it): it gets no gradient.
UNUSED = {"vision_tower.post_norm.scale", "vision_tower.post_norm.bias"}
K = image_token_count(NVILA_CFG)  # 4 tokens + 1 end token


def fresh(state):
    """A copy of a State: the step donates the train state, which takes over the arrays it is given."""
    return jax.tree.map(jnp.copy, state)


def host(state):
    return {n: np.array(v) for n, v in zip(opt.leaf_names(state), jax.tree.leaves(state))}


def text_batch(seed, rows=4, seq=20, vocab=LLM_CFG.vocab_size):
    """Rows of two packed sequences each, random targets and weights (some zero), padding at the end."""
    rng = np.random.default_rng(seed)
    idx = np.arange(seq)[None]
    cut = rng.integers(4, seq - 6, rows)[:, None]
    end = rng.integers(seq - 3, seq + 1, rows)[:, None]
    segments = np.where(idx < cut, 1, np.where(idx < end, 2, 0)).astype(np.int32)
    positions = np.where(segments == 1, idx, np.where(segments == 2, idx - cut, 0)).astype(np.int32)
    weights = ((rng.random((rows, seq)) > 0.3) & (segments > 0)).astype(np.float32)
    return dict(tokens=rng.integers(0, vocab, (rows, seq), dtype=np.int32),
                targets=rng.integers(0, vocab, (rows, seq), dtype=np.int32),
                weights=weights, positions=positions, segment_ids=segments)


def random_params(shapes, seed):
    """Every parameter random, drawn in NumPy (a jax.random init compiles once per shape: seconds here)."""
    rng = np.random.default_rng(seed)
    return {k: (1.0 + 0.1 * rng.normal(size=v.shape)) if k.endswith(".scale") else 0.05 * rng.normal(size=v.shape)
            for k, v in shapes.items()}


def llm_state(seed=0, cfg=LLM_CFG):
    return nnx.split(model_from_params(cfg, random_params(flat_params(abstract_model(cfg)), seed)))


def nvila_model(seed):
    return nvila_from_params(NVILA_CFG, random_params(flat_params(abstract_nvila(NVILA_CFG)), seed))


def train(graphdef, params, stage, batches, *, total_steps=4, optimizer=None, **step_kw):
    mask = opt.trainable_mask(params, stage)
    optimizer = optimizer or opt.build_optimizer(
        opt.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, weight_decay=0.1), params, mask, total_steps)
    state = init_train_state(graphdef, fresh(params), optimizer, mask)
    step = make_train_step(graphdef, optimizer, attention=dense_attention, **step_kw)
    metrics = []
    for i, batch in enumerate(batches):
        state, m = step(state, batch, jax.random.key(i))
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


# ---------------------------------------------------------------------------------------------- NVILA


def nvila_row(rng, model, segments_spec, seq):
    """One packed row from [(text_before, text_after), ...] per segment, each with one image.

    Returns the row's arrays and its input embeddings built independently through `embed_prompt`.
    """
    ids, embeds, segs, pos, tiles = [], [], [], [], []
    for s, (before, after) in enumerate(segments_spec, start=1):
        short = np.concatenate([rng.integers(6, 59, before), [IMAGE_ID], rng.integers(6, 59, after)])
        tile = rng.normal(size=(1, 28, 28, 3)).astype(np.float32)
        expanded, emb, _ = embed_prompt(model, short, image_blocks(model, tile))
        ids.append(expanded)
        embeds.append(np.asarray(emb))
        segs.append(np.full(len(expanded), s))
        pos.append(np.arange(len(expanded)))
        tiles.append(tile[0])
    pad = seq - sum(len(i) for i in ids)
    pad_emb = np.asarray(model.llm.embed_tokens(jnp.zeros(pad, jnp.int32)))
    row = dict(tokens=np.concatenate(ids + [np.zeros(pad)]).astype(np.int32),
               segment_ids=np.concatenate(segs + [np.zeros(pad)]).astype(np.int32),
               positions=np.concatenate(pos + [np.zeros(pad)]).astype(np.int32))
    return row, np.concatenate(embeds + [pad_emb]), tiles


def test_nvila_batch_loss_equals_embed_prompt_and_functional_loss():
    model = nvila_model(1)
    rng = np.random.default_rng(7)
    seq, max_images = 26, 2
    specs = [[(3, 4), (2, 3)], [(6, 5)]]  # row 0: two segments with an image each; row 1: one image
    rows, embeddings, images = [], [], np.zeros((2, max_images, 28, 28, 3), np.float32)
    for b, spec in enumerate(specs):
        row, emb, tiles = nvila_row(rng, model, spec, seq)
        rows.append(row)
        embeddings.append(emb)
        images[b, :len(tiles)] = tiles
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["targets"] = rng.integers(0, LLM_CFG.vocab_size, (2, seq), dtype=np.int32)
    batch["weights"] = ((rng.random((2, seq)) > 0.3) & (batch["tokens"] != IMAGE_ID)
                        & (batch["segment_ids"] > 0)).astype(np.float32)
    batch["images"] = images
    assert (batch["tokens"] == IMAGE_ID).sum(1).tolist() == [2 * K, K]

    llm_graphdef, llm_params = nnx.split(model.llm)
    want = jax.jit(functional.loss, static_argnames=("graphdef", "attention"))(llm_graphdef, llm_params, batch["tokens"], batch["targets"], batch["weights"],
                           attention=dense_attention, positions=batch["positions"],
                           segment_ids=batch["segment_ids"], input_embeddings=jnp.asarray(np.stack(embeddings)))
    graphdef, params = nnx.split(model)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p, b: forward.batch_loss(graphdef, p, b, attention=dense_attention), has_aux=True))
    (got, aux), grads = loss_and_grad(params, batch)
    # float32; the same math in another order (one batched tower call vs per image).
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(aux["tokens"]) == batch["weights"].sum()
    # The image path is differentiated: the tower and projector get gradients.
    named = host(grads)
    for name in ("vision_tower.patch_embed", "projector.layers.4.kernel"):
        assert np.abs(named[name]).max() > 0, name


def nvila_batch(seed, rows=2, seq=20, max_images=2):
    """Random NVILA rows: images at random places (whole K-runs), unused image slots zero."""
    rng = np.random.default_rng(seed)
    batch = text_batch(seed, rows, seq)
    images = np.zeros((rows, max_images, 28, 28, 3), np.float32)
    for b in range(rows):
        count = b % max_images + 1
        batch["tokens"][b][batch["tokens"][b] == IMAGE_ID] = 1
        for k in range(count):
            start = 1 + k * (K + 2)
            batch["tokens"][b, start:start + K] = IMAGE_ID
            images[b, k] = rng.normal(size=(28, 28, 3))
    batch["weights"] = np.where(batch["tokens"] == IMAGE_ID, 0.0, batch["weights"]).astype(np.float32)
    batch["images"] = images
    return batch


@pytest.mark.parametrize("stage", ["align", "vision_layernorm"])
def test_stage_freezing_on_nvila(stage):
    graphdef, params = nnx.split(nvila_model(2))
    before = host(params)
    state, metrics = train(graphdef, params, stage, [nvila_batch(3), nvila_batch(4)])
    after = host(full_params(state))
    mask = dict(zip(opt.leaf_names(params), jax.tree.leaves(opt.trainable_mask(params, stage))))
    trained = {n for n, m in mask.items() if m}
    assert trained and len(trained) < len(mask)
    if stage == "align":
        assert trained == {n for n in mask if n.startswith("projector.")}
    else:
        assert trained == {n for n in mask if n.startswith("vision_tower.") and (".norm" in n or ".post_norm." in n)}
    for name, value in before.items():
        if name in trained and name not in UNUSED:
            assert not np.array_equal(after[name], value), f"{name} did not change"
        else:
            assert np.array_equal(after[name], value), f"frozen {name} changed"
    # The optimizer holds state for the trainable parameters alone: Adam's mu and nu, nothing else big.
    big = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert big == 2 * sum(before[n].size for n in trained)
    assert all(np.isfinite(m["loss"]) for m in metrics)


# ---------------------------------------------------------------------------------------------- the LLM


def test_grad_accum_equals_one_big_batch_and_bf16_keeps_float32_masters():
    graphdef, params = llm_state()
    batches = [text_batch(10), text_batch(11)]
    # Plain SGD: the parameters move by exactly the gradient (Adam's normalisation would blow up
    # rounding differences of gradients near zero), so equal parameters mean equal gradients.
    sgd = optax.sgd(0.5)
    one, m1 = train(graphdef, params, "all", batches, optimizer=sgd)
    two, m2 = train(graphdef, params, "all", batches, optimizer=sgd, grad_accum=2)
    # float32: microbatch sums of per-token losses and gradients add in another order.
    for a, b in zip(m1, m2):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        assert a["tokens"] == b["tokens"]
    for (name, x), y in zip(host(one.trainable).items(), host(two.trainable).values()):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=name)

    # bf16 compute: the matmuls run in bf16 (parameters cast inside), the loss in float32.
    jaxpr = str(jax.make_jaxpr(lambda p: forward.batch_loss(graphdef, p, batches[0], attention=dense_attention,
                                                            compute_dtype=jnp.bfloat16)[0])(params))
    assert "bf16[4,20,24]" in jaxpr and "preferred_element_type=float32" in jaxpr
    half, mh = train(graphdef, params, "all", batches, compute_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half.trainable))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half.opt_state) if x.ndim > 0)
    # bf16 math (8-bit mantissa) over one layer: the loss agrees to ~1%.
    for a, b in zip(m1, mh):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)
    assert not np.array_equal(host(half.trainable)["embed"], host(params)["embed"])


def test_remat_policies_give_the_same_gradients():
    graphdef, params = llm_state(1, dataclasses.replace(LLM_CFG, num_layers=2))
    batch = text_batch(12)

    def grads(policy):
        fn = jax.jit(jax.grad(lambda p, b: forward.batch_loss(graphdef, p, b, attention=dense_attention,
                                                              remat=policy)[0]))
        return jax.tree.leaves(fn(params, batch))

    def checkpoints(policy):  # remat wraps each decoder layer: one checkpoint per layer in the program
        loss = lambda p, b: forward.batch_loss(graphdef, p, b, attention=dense_attention, remat=policy)[0]
        return str(jax.make_jaxpr(loss)(params, batch)).count("remat2[")  # jax.checkpoint's primitive

    assert checkpoints("none") == 0 and checkpoints("full") == checkpoints("dots") == 2
    want = grads("none")
    for policy in ("full", "dots"):
        for g, w in zip(grads(policy), want):
            # Recomputation repeats the same float32 ops: equal up to XLA's fusion choices.
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.asarray(w)).max() > 0 for w in want)
    with pytest.raises(ValueError, match="unknown remat policy"):
        make_train_step(graphdef, opt.build_optimizer(opt.OptimizerConfig(), params, jax.tree.map(
            lambda _: True, params), 2), attention=dense_attention, remat="sometimes")


def test_lora_only_training_changes_only_the_adapter():
    graphdef, params = llm_state(2)
    lora_config = LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))
    adapter = init_adapter(LLM_CFG, lora_config, jax.random.key(5))
    mask = opt.frozen_mask(params)
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), params, mask, 3)
    state = init_train_state(graphdef, fresh(params), optimizer, mask, lora=adapter)
    step = make_train_step(graphdef, optimizer, attention=dense_attention, lora_config=lora_config)
    batch = text_batch(13)
    before = host(params)
    losses = []
    for i in range(3):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert host(full_params(state)).keys() == before.keys()
    for name, value in host(full_params(state)).items():
        assert np.array_equal(value, before[name]), f"base {name} changed"
    trained = lora_weights(state)
    assert all(np.abs(np.asarray(m.b)).max() > 0 for layer in trained.layers for m in layer.values())
    # The adapter is what moved the loss: the base alone gives the first step's loss, the adapter the next.
    reference = jax.jit(lambda lora: functional.loss(
        graphdef, params, batch["tokens"], batch["targets"], batch["weights"], attention=dense_attention,
        positions=batch["positions"], segment_ids=batch["segment_ids"], lora=lora))
    np.testing.assert_allclose(losses[0], float(reference(None)), rtol=1e-6)
    assert losses[2] < losses[0]
    with_adapter = reference(trained)
    state, metrics = step(state, batch, jax.random.key(9))
    np.testing.assert_allclose(float(metrics["loss"]), float(with_adapter), rtol=1e-5)


def test_bad_input_is_a_clear_error():
    graphdef, params = llm_state()
    mask = opt.trainable_mask(params, "all")
    optimizer = opt.build_optimizer(opt.OptimizerConfig(), params, mask, 2)
    step = make_train_step(graphdef, optimizer, attention=dense_attention, grad_accum=3)
    state = init_train_state(graphdef, fresh(params), optimizer, mask)
    with pytest.raises(ValueError, match="grad_accum=3 does not divide"):
        step(state, text_batch(1, rows=4), None)
    with pytest.raises(ValueError, match="'tokens' has dtype float32"):
        step(state, {**text_batch(1), "tokens": text_batch(1)["tokens"].astype(np.float32)}, None)
    batch = text_batch(1)
    del batch["segment_ids"]
    with pytest.raises(ValueError, match="segment_ids"):
        step(state, batch, None)
    with pytest.raises(ValueError, match="nothing is trainable"):
        init_train_state(graphdef, params, optimizer, opt.frozen_mask(params))
    with pytest.raises(ValueError, match="no vision tower"):
        forward.batch_loss(graphdef, params, {**text_batch(1), "images": np.zeros((4, 1, 28, 28, 3))},
                           attention=dense_attention)
