"""Tiny random Hugging Face models and their conversion into jvila, for parity tests."""

import numpy as np
import torch
import transformers

from jvila.checkpoints.convert import hf_to_params
from jvila.checkpoints.hf_form import HFCheckpoint
from jvila.models.params import model_from_params

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

TINY_CONFIGS = {
    # GQA 4:1, untied head, llama3 rope scaling, attention biases.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, rope_scaling=LLAMA3_ROPE, rope_theta=50000.0,
        max_position_embeddings=512, tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5),
    # Tied embeddings, MQA-like 4:1 ratio, linear rope scaling.
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=157, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0},
        max_position_embeddings=256, tie_word_embeddings=True),
    # Qwen2: q/k/v bias, untied head, custom theta.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=199, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=False),
}


def random_hf_model(name: str, seed: int = 0):
    """A tiny HF causal LM with every parameter random (biases and norms too, unlike HF's init)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def to_jvila(hf_model, **dtypes):
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg, params = hf_to_params(HFCheckpoint(hf_model.config.to_dict(), tensors))
    return model_from_params(cfg, params, **dtypes)


def random_tokens(vocab: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
