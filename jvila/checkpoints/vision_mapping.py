"""NVILA vision-side checkpoint names and layouts ↔ jvila flat params, as tables plus small hooks.

Two state dicts of the NVILA directory layout are covered:
- `vision_tower/`: a SigLIP vision model as VILA saves it (`vision_model.embeddings...`); the
  prefix-free names transformers 5's `SiglipVisionModel.state_dict()` gives are read too.
- `mm_projector/`: VILA's `MultimodalProjector`, an `nn.Sequential` named `layers` whose indices
  (`layers.2.weight`) are those of the projector type (see `jvila.models.projector`).
jvila names carry the NVILA model's child prefixes, `vision_tower.` and `projector.`.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from jvila.checkpoints.errors import CheckpointError
# One rule shape and the layout-free hooks for every mapping table (the config they get differs).
from jvila.checkpoints.param_mapping import Rule, _same, _transpose
from jvila.models.projector import projector_layers
from jvila.vision_config import SiglipConfig

HF_VISION_PREFIX = "vision_model."
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "projector."

def _heads_in(w, cfg):  # [heads*d, in] → [in, heads, d]
    return w.T.reshape(w.shape[1], cfg.num_heads, cfg.head_dim)


def _heads_in_to_hf(w, cfg):
    return w.reshape(w.shape[0], -1).T


def _bias_heads(b, cfg):
    return b.reshape(cfg.num_heads, cfg.head_dim)


def _flatten(b, cfg):
    return b.reshape(-1)


def _heads_out(w, cfg):  # [out, heads*d] → [heads, d, out]
    return w.T.reshape(cfg.num_heads, cfg.head_dim, w.shape[0])


def _heads_out_to_hf(w, cfg):
    return w.reshape(-1, w.shape[-1]).T


def _conv_to_jvila(w, cfg):  # Conv2d [out, in, kh, kw] → [kh, kw, in, out]
    return w.transpose(2, 3, 1, 0)


def _conv_to_hf(w, cfg):
    return w.transpose(3, 2, 0, 1)


def _probe_to_hf(w, cfg):
    return w.reshape(1, 1, -1)


_norm = lambda hf, jv: (Rule(f"{hf}.weight", f"{jv}.scale", _same, _same),  # noqa: E731
                        Rule(f"{hf}.bias", f"{jv}.bias", _same, _same))

GLOBAL_RULES = (
    Rule("embeddings.patch_embedding.weight", "patch_embed", _conv_to_jvila, _conv_to_hf),
    Rule("embeddings.patch_embedding.bias", "patch_bias", _same, _same),
    Rule("embeddings.position_embedding.weight", "position_embed", _same, _same),
    *_norm("post_layernorm", "post_norm"),
)

LAYER_RULES = (
    *_norm("encoder.layers.{i}.layer_norm1", "layers.{i}.norm1"),
    *_norm("encoder.layers.{i}.layer_norm2", "layers.{i}.norm2"),
    *(rule for name in "qkv" for rule in (
        Rule(f"encoder.layers.{{i}}.self_attn.{name}_proj.weight", f"layers.{{i}}.attn.{name}_proj",
             _heads_in, _heads_in_to_hf),
        Rule(f"encoder.layers.{{i}}.self_attn.{name}_proj.bias", f"layers.{{i}}.attn.{name}_bias",
             _bias_heads, _flatten))),
    Rule("encoder.layers.{i}.self_attn.out_proj.weight", "layers.{i}.attn.o_proj", _heads_out, _heads_out_to_hf),
    Rule("encoder.layers.{i}.self_attn.out_proj.bias", "layers.{i}.attn.o_bias", _same, _same),
    Rule("encoder.layers.{i}.mlp.fc1.weight", "layers.{i}.mlp.fc1", _transpose, _transpose),
    Rule("encoder.layers.{i}.mlp.fc1.bias", "layers.{i}.mlp.fc1_bias", _same, _same),
    Rule("encoder.layers.{i}.mlp.fc2.weight", "layers.{i}.mlp.fc2", _transpose, _transpose),
    Rule("encoder.layers.{i}.mlp.fc2.bias", "layers.{i}.mlp.fc2_bias", _same, _same),
)

HEAD_RULES = (
    Rule("head.probe", "head.probe", _flatten, _probe_to_hf),
    Rule("head.attention.in_proj_weight", "head.in_proj", _transpose, _transpose),
    Rule("head.attention.in_proj_bias", "head.in_proj_bias", _same, _same),
    Rule("head.attention.out_proj.weight", "head.out_proj", _transpose, _transpose),
    Rule("head.attention.out_proj.bias", "head.out_proj_bias", _same, _same),
    *_norm("head.layernorm", "head.norm"),
    Rule("head.mlp.fc1.weight", "head.mlp.fc1", _transpose, _transpose),
    Rule("head.mlp.fc1.bias", "head.mlp.fc1_bias", _same, _same),
    Rule("head.mlp.fc2.weight", "head.mlp.fc2", _transpose, _transpose),
    Rule("head.mlp.fc2.bias", "head.mlp.fc2_bias", _same, _same),
)


def siglip_rules(cfg: SiglipConfig) -> list[Rule]:
    """Every rule of this tower, with the `vision_model.` and `vision_tower.` prefixes and layer indices."""
    rules = list(GLOBAL_RULES) + (list(HEAD_RULES) if cfg.use_head else [])
    for i in range(cfg.num_layers):
        rules += [r._replace(hf=r.hf.format(i=i), jvila=r.jvila.format(i=i)) for r in LAYER_RULES]
    return [r._replace(hf=HF_VISION_PREFIX + r.hf, jvila=VISION_PREFIX + r.jvila) for r in rules]


def siglip_config_for_tensors(cfg: SiglipConfig, names) -> SiglipConfig:
    """`cfg` with `use_head` set by whether the checkpoint holds the pooling head.

    The config alone cannot say: towers saved before `vision_use_head` existed omit the key (which
    transformers reads as True) although PaliGemma-derived towers, NVILA's, carry no head.
    """
    return dataclasses.replace(cfg, use_head=any(n.endswith("head.probe") for n in names))


def siglip_hf_to_jvila(tensors: dict[str, np.ndarray], cfg: SiglipConfig) -> dict[str, np.ndarray]:
    """`vision_tower/` state dict → flat jvila params (`vision_tower.*`). Unknown or missing tensors are errors."""
    # Names without the `vision_model.` prefix (transformers 5's own state dict) mean the same tensors.
    tensors = {(n if n.startswith(HF_VISION_PREFIX) else HF_VISION_PREFIX + n): v for n, v in tensors.items()}
    return _apply(siglip_rules(cfg), tensors, cfg, what="vision tower")


def siglip_jvila_to_hf(params: dict[str, np.ndarray], cfg: SiglipConfig) -> dict[str, np.ndarray]:
    """Flat jvila params (`vision_tower.*`) → the `vision_tower/` state dict, as VILA names it."""
    return _unapply(siglip_rules(cfg), params, cfg)


def projector_rules(projector_type: str, in_dim: int, out_dim: int) -> list[Rule]:
    """Rules of one projector type: its Sequential's linear and LayerNorm indices."""
    layers = projector_layers(projector_type, in_dim, out_dim)
    # VILA's "linear" projector is a bare nn.Linear named `layers`, not a Sequential.
    bare = projector_type == "linear"
    rules = []
    for index, layer in enumerate(layers):
        hf = "layers" if bare else f"layers.{index}"
        jv = f"{PROJECTOR_PREFIX}layers.{index}"
        if layer.kind == "linear":
            rules += [Rule(f"{hf}.weight", f"{jv}.kernel", _transpose, _transpose),
                      Rule(f"{hf}.bias", f"{jv}.bias", _same, _same)]
        elif layer.kind == "layer_norm":
            rules += list(_norm(hf, jv))
    return rules


def projector_hf_to_jvila(tensors: dict[str, np.ndarray], projector_type: str, in_dim: int,
                          out_dim: int) -> dict[str, np.ndarray]:
    """`mm_projector/` state dict → flat jvila params (`projector.*`)."""
    return _apply(projector_rules(projector_type, in_dim, out_dim), tensors, None, what="projector")


def projector_jvila_to_hf(params: dict[str, np.ndarray], projector_type: str, in_dim: int,
                          out_dim: int) -> dict[str, np.ndarray]:
    """Flat jvila params (`projector.*`) → the `mm_projector/` state dict."""
    return _unapply(projector_rules(projector_type, in_dim, out_dim), params, None)


def _apply(rules: list[Rule], tensors: dict, cfg, *, what: str) -> dict[str, np.ndarray]:
    missing = [r.hf for r in rules if r.hf not in tensors]
    if missing:
        raise CheckpointError(f"{what} checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    unknown = sorted(set(tensors) - {r.hf for r in rules})
    if unknown:
        raise CheckpointError(f"{what} checkpoint has {len(unknown)} tensors the config does not use, "
                              f"e.g. {unknown[:3]}")
    return {r.jvila: r.to_jvila(np.asarray(tensors[r.hf]), cfg) for r in rules}


def _unapply(rules: list[Rule], params: dict, cfg) -> dict[str, np.ndarray]:
    out = {}
    for r in rules:
        if r.jvila not in params:
            raise CheckpointError(f"jvila params lack {r.jvila!r}")
        out[r.hf] = np.ascontiguousarray(r.to_hf(np.asarray(params[r.jvila]), cfg))
    return out
