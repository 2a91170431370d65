"""The optimizer of the train step: AdamW with warmup + cosine, clipping, per-module learning rates, stage masks.

Parameters are named by their flat dotted paths (`jvila.models.params.flat_params`:
"llm.layers.0.attn.q_proj", "vision_tower.post_norm.scale", ...); LoRA adapter matrices held by a
train state are named "lora.layers.<i>.<module>.a" / ".b". Stages and learning-rate multipliers
are glob patterns (`fnmatch`) over those names.

- `trainable_mask(params, stage_or_patterns)`: which parameters a stage trains (NVILA's stages:
  align = projector only, vision_pretrain = tower + projector, llm_pretrain = projector + LLM,
  sft / all = everything, vision_layernorm = the tower's LayerNorms only, NVILA's cheap tuning).
- `build_optimizer(cfg, params, trainable, total_steps)`: an optax transform over the trainable
  parameters only (the train step hands it no frozen ones, so it keeps no state for them):
  global-norm clipping, then AdamW whose learning rate follows linear warmup over
  `warmup_ratio * total_steps` steps and then cosine decay to 0 (HF Trainer's
  `get_cosine_schedule_with_warmup`, which VILA's scripts use) or stays constant, then a per-
  parameter factor from `lr_multipliers` (NVILA trains the vision tower at a lower LR). Weight
  decay applies to matrices only (ndim >= 2, name not ending in "bias"): biases and norm scales
  are not decayed, as in HF Trainer's default grouping. The learning rate of each update is recorded in the optimizer
  state (`optax.inject_hyperparams`), where `current_learning_rate` finds it for the step's metrics.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

# Stage name → patterns of trainable parameter names. "vision_layernorm" is resolved by
# `_is_vision_layernorm` (LayerNorm parameters are recognised by their module, not a glob).
STAGES: dict[str, tuple[str, ...]] = {
    "align": ("projector.*",),
    "vision_pretrain": ("vision_tower.*", "projector.*"),
    "llm_pretrain": ("projector.*", "llm.*"),
    "sft": ("*",),
    "all": ("*",),
    "vision_layernorm": (),
}
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. `clip_norm` None = no clipping; `lr_multipliers`: {glob over flat names: factor}."""

    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got b1={self.b1!r}, b2={self.b2!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None (no clipping), got {self.clip_norm!r}")
        for pattern, factor in dict(self.lr_multipliers).items():
            if not isinstance(pattern, str) or not isinstance(factor, (int, float)) or factor < 0:
                raise ValueError(f"lr_multipliers maps glob patterns to factors >= 0, got {pattern!r}: {factor!r}")
        object.__setattr__(self, "lr_multipliers", dict(self.lr_multipliers))


# ----------------------------------------------------------------------------------------------
# Names of pytree leaves
# ----------------------------------------------------------------------------------------------

def leaf_name(path) -> str:
    """The flat dotted name of a leaf of an nnx State (or a plain nested dict/tuple) from its key path.

    The `.value` attribute of an nnx Variable is not part of the name (flat_params' convention).
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(getattr(key, "key", getattr(key, "name", key))))
    return ".".join(parts)


def leaf_names(tree) -> list[str]:
    return [leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _is_vision_layernorm(name: str) -> bool:
    """A LayerNorm parameter of the SigLIP tower (its layers' layer_norm1/2 and the post norm)."""
    if not name.startswith("vision_tower."):
        return False
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] in ("scale", "bias") and ("norm" in parts[-2])


# ----------------------------------------------------------------------------------------------
# Stage masks
# ----------------------------------------------------------------------------------------------

def stage_patterns(stage_or_patterns: str | Sequence[str]) -> tuple[str, ...]:
    """A stage name's patterns, or the given patterns themselves. Unknown stage → ValueError."""
    if isinstance(stage_or_patterns, str):
        if stage_or_patterns not in STAGES:
            raise ValueError(f"unknown training stage {stage_or_patterns!r}; known stages: {sorted(STAGES)} "
                             "(or give a list of glob patterns over parameter names)")
        return STAGES[stage_or_patterns]
    patterns = tuple(stage_or_patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"trainable patterns must be a non-empty list of glob strings, got {stage_or_patterns!r}")
    return patterns


def trainable_mask(params, stage_or_patterns: str | Sequence[str]):
    """A pytree like `params` of Python bools: True where the stage trains that parameter.

    `stage_or_patterns`: a name in STAGES or a list of glob patterns; patterns may also name
    "vision_layernorm" to add the tower's LayerNorms. A pattern that matches no parameter is an
    error (a typo would otherwise freeze everything silently), and so is a mask with nothing
    trainable (LoRA-only training uses `frozen_mask`).
    """
    stage = stage_or_patterns if isinstance(stage_or_patterns, str) else None
    patterns = stage_patterns(stage_or_patterns)
    layernorm = stage == "vision_layernorm" or "vision_layernorm" in patterns
    patterns = tuple(p for p in patterns if p != "vision_layernorm")
    names = leaf_names(params)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter (names look like {names[:3]})")

    def trains(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns) or (layernorm and _is_vision_layernorm(name))

    mask = jax.tree_util.tree_map_with_path(lambda path, _: trains(leaf_name(path)), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"stage {stage_or_patterns!r} leaves no parameter of this model trainable")
    return mask


def frozen_mask(params):
    """A mask with nothing trainable (LoRA-only training: the base model frozen whole)."""
    return jax.tree.map(lambda _: False, params)


# ----------------------------------------------------------------------------------------------
# The optax transform
# ----------------------------------------------------------------------------------------------

def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ceil(warmup_ratio * total_steps) steps, then cosine to 0 or constant."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(-(-cfg.warmup_ratio * total_steps // 1))  # HF: math.ceil(num_training_steps * warmup_ratio)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - warmup, 1))
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def lr_factors(tree, multipliers: Mapping[str, float]):
    """Per leaf: the factor of the first pattern in `multipliers` matching its name, else 1.0."""
    def factor(path, _):
        name = leaf_name(path)
        return next((float(f) for p, f in multipliers.items() if fnmatch.fnmatchcase(name, p)), 1.0)

    return jax.tree_util.tree_map_with_path(factor, tree)


def _scale_by_lr_multipliers(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each update by its parameter's factor (names come from the updates' own paths)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        factors = lr_factors(updates, multipliers)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(init, update)


def decay_mask(tree):
    """True for the weights AdamW decays: matrices, not biases (some are 2-D here: [heads, head_dim]) or norms."""
    def decays(path, leaf):
        return leaf.ndim >= 2 and not leaf_name(path).rsplit(".", 1)[-1].endswith("bias")

    return jax.tree_util.tree_map_with_path(decays, tree)


def build_optimizer(cfg: OptimizerConfig, params, trainable, total_steps: int) -> optax.GradientTransformation:
    """The optax transform for the trainable part of `params` (mask `trainable`, see `trainable_mask`).

    It is applied by the train step to the trainable parameters alone; `params` and `trainable` are
    used here to check that every `lr_multipliers` pattern names at least one trainable parameter.
    """
    trainable_names = [n for n, t in zip(leaf_names(params), jax.tree.leaves(trainable)) if t]
    for pattern in cfg.lr_multipliers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in trainable_names) and not pattern.startswith("lora."):
            raise ValueError(f"lr_multipliers pattern {pattern!r} matches no trainable parameter")
    schedule = learning_rate_schedule(cfg, total_steps)

    def make(learning_rate):
        parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
        parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=decay_mask))
        if cfg.lr_multipliers:
            parts.append(_scale_by_lr_multipliers(cfg.lr_multipliers))
        return optax.chain(*parts)

    return optax.inject_hyperparams(make)(learning_rate=schedule)


def current_learning_rate(opt_state):
    """The learning rate of the update that produced `opt_state` (float32 scalar), NaN if not recorded."""
    def recorded(x):  # optax's inject_hyperparams states (the stateful variant is what it builds today)
        return isinstance(x, tuple) and hasattr(x, "hyperparams") and isinstance(x.hyperparams, dict)

    for node in jax.tree.leaves(opt_state, is_leaf=recorded):
        if recorded(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)
