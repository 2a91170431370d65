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


def randomize(model, seed: int | None = None):
    """Every parameter random (biases and norms too, unlike HF's init, so none can go unchecked)."""
    # No seed: fresh values each run, so the tests are not tuned to one draw.
    seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def random_hf_model(name: str, seed: int = 0):
    """One of TINY_CONFIGS, every parameter random."""
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), attn_implementation="eager")
    return randomize(model, seed)


# Sizes that divide nothing in particular, but keep rows a multiple of 32 for Q8_0 blocks.
TINY_SIZES = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

_CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
_MODEL_CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}

def build_tiny_model(family: str, *, tie: bool, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A tiny HF causal LM whose every parameter (norms included) is freshly random."""
    config = _CONFIG_CLASSES[family](**(TINY_SIZES | overrides), tie_word_embeddings=tie)
    return randomize(_MODEL_CLASSES[family](config)).to(dtype)


def to_jvila(hf_model, **dtypes):
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg, params = hf_to_params(HFCheckpoint(hf_model.config.to_dict(), tensors))
    return model_from_params(cfg, params, **dtypes)


def random_tokens(vocab: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@torch.no_grad()
def transformers_greedy(model, ids, steps, stop_ids):
    """Greedy tokens of a PyTorch causal LM, whole sequence each step (no cache), up to a stop id."""
    out, ids = [], list(ids)
    for _ in range(steps):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        ids.append(token)
    return out
