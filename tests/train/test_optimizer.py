"""The optimizer: stage masks over NVILA's parameter names, the warmup-cosine schedule, and AdamW with
clipping, decay only on matrices and per-module learning-rate factors — against NumPy written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvila.config import LLMConfig
from jvila.models.nvila import abstract_nvila
from jvila.models.params import flat_params
from jvila.train import optimizer as opt
from jvila.vision_config import NVILAConfig, SiglipConfig

CFG = NVILAConfig(
    llm=LLMConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8),
    vision=SiglipConfig(hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2, image_size=28, patch_size=7),
    image_aspect_ratio="resize", dynamic_s2=False, image_token_id=30, video_token_id=31, media_end_token_ids=(3,))


def abstract_params():
    from flax import nnx

    return nnx.state(abstract_nvila(CFG), nnx.Param)


def trained_names(stage):
    params = abstract_params()
    mask = opt.trainable_mask(params, stage)
    return {n for n, m in zip(opt.leaf_names(params), jax.tree.leaves(mask)) if m}


def test_stage_masks_name_the_right_parameters():
    names = set(flat_params(abstract_nvila(CFG)))
    assert set(opt.leaf_names(abstract_params())) == names  # leaf names are flat_params' names
    by_part = {part: {n for n in names if n.startswith(part + ".")} for part in ("llm", "vision_tower", "projector")}
    assert trained_names("align") == by_part["projector"]
    assert trained_names("vision_pretrain") == by_part["vision_tower"] | by_part["projector"]
    assert trained_names("llm_pretrain") == by_part["projector"] | by_part["llm"]
    assert trained_names("sft") == trained_names("all") == names
    layernorms = {n for n in by_part["vision_tower"] if n.split(".")[-2] in ("norm1", "norm2", "post_norm")}
    assert len(layernorms) == 2 * 2 * 2 + 2  # 2 layers x 2 norms x (scale, bias) + the post norm
    assert trained_names("vision_layernorm") == layernorms
    assert trained_names(["projector.*", "vision_layernorm"]) == layernorms | by_part["projector"]
    assert trained_names(["llm.layers.1.*"]) == {n for n in names if n.startswith("llm.layers.1.")}


def test_bad_stages_and_configs_are_clear_errors():
    params = abstract_params()
    with pytest.raises(ValueError, match=r"unknown training stage 'projector'.*align"):
        opt.trainable_mask(params, "projector")
    with pytest.raises(ValueError, match="matches no parameter"):
        opt.trainable_mask(params, ["projektor.*"])
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        opt.OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="clip_norm"):
        opt.OptimizerConfig(clip_norm=0.0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        opt.OptimizerConfig(warmup_ratio=1.5)
    mask = opt.trainable_mask(params, "align")
    with pytest.raises(ValueError, match="'vision_tower.*' matches no trainable parameter"):
        opt.build_optimizer(opt.OptimizerConfig(lr_multipliers={"vision_tower.*": 0.1}), params, mask, 10)


def hf_cosine_with_warmup(step, base, total, ratio):
    """transformers' get_cosine_schedule_with_warmup (num_cycles 0.5), written out."""
    warmup = math.ceil(total * ratio)
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("total,ratio", [(37, 0.1), (10, 0.03), (7, 0.0)])
def test_schedule_is_warmup_then_cosine(total, ratio):
    cfg = opt.OptimizerConfig(learning_rate=3e-4, warmup_ratio=ratio)
    schedule = opt.learning_rate_schedule(cfg, total)
    for step in range(total + 1):
        # float32 schedule arithmetic against float64.
        np.testing.assert_allclose(float(schedule(step)), hf_cosine_with_warmup(step, 3e-4, total, ratio),
                                   rtol=1e-5, atol=1e-12, err_msg=f"step {step}")
    constant = opt.learning_rate_schedule(opt.OptimizerConfig(learning_rate=2e-3, warmup_ratio=0.25,
                                                              schedule="constant"), 8)
    assert [round(float(constant(s)), 8) for s in (0, 1, 2, 3, 7)] == [0.0, 0.001, 0.002, 0.002, 0.002]


def numpy_adamw(params, grads_per_step, *, lrs, factors, b1, b2, eps, wd, clip):
    """AdamW (decoupled decay on matrices only, never biases) after global-norm clipping, per-leaf LR factors."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
        scale = min(1.0, clip / norm)
        for k in params:
            g = grads[k] * scale
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g * g
            step = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
            if params[k].ndim >= 2 and not k.endswith("bias"):
                step = step + wd * params[k]
            params[k] = params[k] - lr * factors[k] * step
    return params


def test_adamw_with_clipping_decay_mask_and_lr_factors():
    rng = np.random.default_rng(0)
    shapes = {"vision_tower": {"w": (3, 5), "b": (5,)}, "llm": {"w": (4, 3), "norm": (4,), "q_bias": (2, 3)},
              "projector": {"w": (2, 2)}}
    params = {p: {n: rng.normal(size=s).astype(np.float32) for n, s in d.items()} for p, d in shapes.items()}
    cfg = opt.OptimizerConfig(learning_rate=0.05, warmup_ratio=0.25, weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-6,
                              clip_norm=1.5, lr_multipliers={"vision_tower.*": 0.1, "llm.norm": 2.0})
    mask = jax.tree.map(lambda _: True, params)
    optimizer = opt.build_optimizer(cfg, params, mask, total_steps=4)
    state = optimizer.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(optimizer.update)
    current = jax.tree.map(jnp.asarray, params)
    grads_per_step, lrs = [], []
    for step in range(4):
        # Large gradients on some steps, so clipping acts on some and not others.
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * (3.0 if step % 2 else 0.2),
                             params)
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)
        grads_per_step.append({f"{p}.{n}": g for p, d in grads.items() for n, g in d.items()})
        lrs.append(float(opt.current_learning_rate(state)))
    # The learning rate each update used: warmup over ceil(0.25 * 4) = 1 step, then cosine.
    np.testing.assert_allclose(lrs, [hf_cosine_with_warmup(s, 0.05, 4, 0.25) for s in range(4)], rtol=1e-6)
    flat = {f"{p}.{n}": v for p, d in params.items() for n, v in d.items()}
    factors = {k: 0.1 if k.startswith("vision_tower.") else 2.0 if k == "llm.norm" else 1.0 for k in flat}
    want = numpy_adamw(flat, grads_per_step, lrs=lrs, factors=factors, b1=0.8, b2=0.95, eps=1e-6, wd=0.3, clip=1.5)
    got = {f"{p}.{n}": np.asarray(v) for p, d in current.items() for n, v in d.items()}
    for k in want:
        # float32 optimizer arithmetic against float64 over four steps.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
