"""Hugging Face form: the interchange every checkpoint format converts to and from.

A checkpoint in this form is an HF `config.json` dict, a state dict in HF's names and layouts
(`model.layers.0.self_attn.q_proj.weight` is [out, in]) and the tokenizer files that sit beside
them in an HF model directory. Readers produce it, writers consume it, and the mapping to jvila's
own parameters starts from it, so no format needs to know about any other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jvila.checkpoints.errors import CheckpointError
from jvila.config import HF_ARCHITECTURES

# Files of an HF model directory that describe the tokenizer and generation, kept verbatim.
TOKENIZER_FILENAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
)

# HF `model_type` → the causal-LM class name that goes in `architectures`.
CAUSAL_LM_ARCHITECTURES = HF_ARCHITECTURES


@dataclasses.dataclass
class HFCheckpoint:
    """An HF config dict, a state dict {hf_name: array} and tokenizer files {filename: content}."""

    config: dict
    tensors: dict[str, np.ndarray]
    tokenizer_files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama/Qwen2 causal LM with this config holds, with its HF shape."""
    model_type = config.get("model_type")
    if model_type not in CAUSAL_LM_ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture model_type={model_type!r}; supported: {sorted(CAUSAL_LM_ARCHITECTURES)}"
        )
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inner = config["intermediate_size"]
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    # Qwen2 always carries q/k/v biases; Llama has q/k/v/o biases when `attention_bias` is set
    # and gate/up/down biases when `mlp_bias` is.
    llama_attention_bias = model_type == "llama" and bool(config.get("attention_bias", False))
    has_qkv_bias = model_type == "qwen2" or llama_attention_bias
    has_mlp_bias = model_type == "llama" and bool(config.get("mlp_bias", False))

    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (q_width, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_width),
            f"{prefix}.mlp.gate_proj.weight": (inner, hidden),
            f"{prefix}.mlp.up_proj.weight": (inner, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inner),
        }
        if has_qkv_bias:
            shapes |= {
                f"{prefix}.self_attn.q_proj.bias": (q_width,),
                f"{prefix}.self_attn.k_proj.bias": (kv_width,),
                f"{prefix}.self_attn.v_proj.bias": (kv_width,),
            }
        if llama_attention_bias:
            shapes[f"{prefix}.self_attn.o_proj.bias"] = (hidden,)
        if has_mlp_bias:
            shapes |= {
                f"{prefix}.mlp.gate_proj.bias": (inner,),
                f"{prefix}.mlp.up_proj.bias": (inner,),
                f"{prefix}.mlp.down_proj.bias": (hidden,),
            }
    return shapes


def check_tensor_shapes(ckpt: HFCheckpoint, *, require_all: bool) -> None:
    """Raise CheckpointError when a known tensor has the wrong shape (or, if required, is missing)."""
    expected = expected_tensor_shapes(ckpt.config)
    for name, shape in expected.items():
        if name not in ckpt.tensors:
            if require_all:
                raise CheckpointError(f"tensor {name} is missing (expected shape {shape})")
            continue
        actual = tuple(ckpt.tensors[name].shape)
        if actual != shape:
            raise CheckpointError(f"shape mismatch for {name}: got {actual}, config implies {shape}")
