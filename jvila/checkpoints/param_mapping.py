"""Hugging Face ↔ jvila parameter names and layouts, as one table plus small hooks.

Keys on the jvila side are flat dotted paths into the model's state ("layers.3.attn.q_proj").
Each rule maps one HF tensor to one jvila parameter; `{i}` stands for the layer index. A hook pair
converts the layout: HF stores linear weights [out, in] with heads folded into one axis; jvila
stores [in, ..., out] with heads as their own axis (so they can be sharded by head).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from jvila.checkpoints.errors import CheckpointError
from jvila.config import LLMConfig

Hook = Callable[[np.ndarray, LLMConfig], np.ndarray]


class Rule(NamedTuple):
    hf: str
    jvila: str
    to_jvila: Hook
    to_hf: Hook


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _split_heads(heads: Callable[[LLMConfig], int]):
    """[heads*d, in] → [in, heads, d] and back."""

    def to_jvila(w, cfg):
        return w.T.reshape(w.shape[1], heads(cfg), cfg.head_dim)

    def to_hf(w, cfg):
        return w.reshape(w.shape[0], -1).T

    return to_jvila, to_hf


def _split_bias(heads: Callable[[LLMConfig], int]):
    return (lambda b, cfg: b.reshape(heads(cfg), cfg.head_dim)), (lambda b, cfg: b.reshape(-1))


def _o_proj_to_jvila(w, cfg):  # [hidden, heads*d] → [heads, d, hidden]
    return w.T.reshape(cfg.num_heads, cfg.head_dim, w.shape[0])


def _o_proj_to_hf(w, cfg):
    return w.reshape(-1, w.shape[-1]).T


_q_heads = lambda cfg: cfg.num_heads  # noqa: E731
_kv_heads = lambda cfg: cfg.num_kv_heads  # noqa: E731

GLOBAL_RULES = (
    Rule("model.embed_tokens.weight", "embed", _same, _same),
    Rule("model.norm.weight", "final_norm.scale", _same, _same),
    Rule("lm_head.weight", "lm_head", _transpose, _transpose),
)

LAYER_RULES = (
    Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale", _same, _same),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.scale", _same, _same),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj", *_split_heads(_q_heads)),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj", *_split_heads(_kv_heads)),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj", *_split_heads(_kv_heads)),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj", _o_proj_to_jvila, _o_proj_to_hf),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", _transpose, _transpose),
    Rule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj", _transpose, _transpose),
    Rule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj", _transpose, _transpose),
)

BIAS_RULES = (
    Rule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_bias", *_split_bias(_q_heads)),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_bias", *_split_bias(_kv_heads)),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_bias", *_split_bias(_kv_heads)),
)


OUT_BIAS_RULES = (Rule("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_bias", _same, _same),)


def rules_for(cfg: LLMConfig) -> list[Rule]:
    """Every rule of this model, layer indices filled in."""
    rules = [r for r in GLOBAL_RULES if not (cfg.tie_embeddings and r.jvila == "lm_head")]
    per_layer = LAYER_RULES + (BIAS_RULES if cfg.qkv_bias else ()) + (OUT_BIAS_RULES if cfg.out_bias else ())
    for i in range(cfg.num_layers):
        rules += [r._replace(hf=r.hf.format(i=i), jvila=r.jvila.format(i=i)) for r in per_layer]
    return rules


def hf_to_jvila(tensors: dict[str, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """HF state dict → flat jvila params. Unknown or missing tensors are errors, not silently dropped."""
    rules = rules_for(cfg)
    # Checkpoints with tied embeddings sometimes still carry a copy of the head; it is redundant.
    # Old exports also carry rotary inverse frequencies, a buffer recomputed from the config.
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = [r.hf for r in rules if r.hf not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    unknown = sorted(
        n for n in set(tensors) - {r.hf for r in rules} - ignorable if not n.endswith("rotary_emb.inv_freq")
    )
    if unknown:
        raise CheckpointError(
            f"checkpoint has {len(unknown)} tensors this architecture does not use, e.g. {unknown[:3]}"
        )
    return {r.jvila: r.to_jvila(np.asarray(tensors[r.hf]), cfg) for r in rules}


def jvila_to_hf(params: dict[str, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """Flat jvila params → HF state dict."""
    out = {}
    for r in rules_for(cfg):
        if r.jvila not in params:
            raise CheckpointError(f"jvila params lack {r.jvila!r}")
        out[r.hf] = np.ascontiguousarray(r.to_hf(np.asarray(params[r.jvila]), cfg))
    return out
