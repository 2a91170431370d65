"""GGUF metadata → an HF `config.json` dict, for the llama and qwen2 architectures.

GGUF keeps the model's hyper-parameters as llama.cpp-named metadata (`llama.block_count`, ...) and,
for Llama 3's rope scaling, a `rope_freqs.weight` tensor of per-frequency divisors instead of the
scaling's parameters; both are translated back to the keys transformers reads.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.hf_form import CAUSAL_LM_ARCHITECTURES

# GGUF `general.architecture` → HF `model_type`.
GGUF_TO_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}

# Vocabulary arrays are large and only the tokenizer conversion needs them.
_SKIPPED_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All metadata of a GGUF file as plain Python values, minus the vocabulary arrays."""
    metadata = {}
    for key, field in reader.fields.items():
        if key in _SKIPPED_KEYS or key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(field)
    return metadata


def _field_value(field) -> Any:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        element = field.types[-1]
        return [_scalar(field.parts[i], element) for i in field.data]
    return _scalar(field.parts[field.data[0]], kind)


def _scalar(part: np.ndarray, kind) -> Any:
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part[0].item()
    if kind == gguf.GGUFValueType.FLOAT32:
        # GGUF stores float32: take the shortest decimal that rounds to it (1e-05, not 9.99999974e-06).
        return float(str(np.float32(value)))
    return value


def hf_config_from_gguf(
    metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    """The HF config of a GGUF llama/qwen2 model; `tensor_shapes` are numpy shapes by GGUF name."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_TO_HF_MODEL_TYPE:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_TO_HF_MODEL_TYPE)}")
    model_type = GGUF_TO_HF_MODEL_TYPE[arch]

    def required(name: str) -> Any:
        key = f"{arch}.{name}"
        if key not in metadata:
            raise CheckpointError(f"GGUF metadata key {key} is missing")
        return metadata[key]

    hidden = required("embedding_length")
    heads = required("attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in tensor_shapes:
            raise CheckpointError(f"GGUF tensor {name} is missing")
    # The query projection's row count is the one unambiguous source of the head width.
    head_dim = tensor_shapes["blk.0.attn_q.weight"][0] // heads
    rotary_dims = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise CheckpointError(f"partial rotary embeddings ({rotary_dims} of {head_dim} dims) are not supported")
    theta = metadata.get(f"{arch}.rope.freq_base", 10000.0)

    config: dict[str, Any] = {
        "architectures": [CAUSAL_LM_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(metadata, arch, rope_freqs, theta, head_dim),
        "max_position_embeddings": required("context_length"),
        # llama.cpp writes `output.weight` only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_shapes
    else:
        config["use_sliding_window"] = False
    return config


def _rope_scaling(
    metadata: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int
) -> dict[str, Any] | None:
    if rope_freqs is not None:
        return rope_scaling_from_factors(rope_freqs, theta, head_dim)
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"unsupported GGUF rope scaling type {kind!r}")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": metadata[f"{arch}.rope.scaling.factor"]}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors a Llama 3 rope scaling applies (what GGUF stores in `rope_freqs`)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen > original / low, factor, blended)
    return np.where(wavelen < original / high, 1.0, divisors)


def rope_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover the HF rope scaling whose per-frequency divisors are `factors`.

    A constant divisor is linear scaling. Otherwise it must be Llama 3's: long wavelengths divided by
    `factor`, short ones kept, and a band between them blended linearly in 1/wavelength. The divisors
    fix the band's edges only as ratios of the original context, so `low_freq_factor` is taken as 1
    (as in every Llama 3 release); the result is checked by recomputing the divisors.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"rope_freqs.weight has shape {factors.shape}, expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return None
    if np.allclose(factors, factors[0]):
        return {"rope_type": "linear", "factor": round(float(factors[0]), 6)}

    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    in_band = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    # Inside the band 1/divisor = (1 - s)/factor + s with s = (original/wavelen - 1) / (high - 1).
    smooth = (1 / factors[in_band] - 1 / factor) / (1 - 1 / factor)
    if in_band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[in_band], smooth, 1)
        high = 1 - 1 / intercept
        original = slope * (high - 1)
    else:
        high = 4.0
        if in_band.any():
            original = wavelen[in_band][0] * (smooth[0] * (high - 1) + 1)
        else:
            # No wavelength in the band: any original context between the two kinds of divisor fits.
            kept_max = wavelen[factors <= 1 + 1e-6].max(initial=0.0) * high
            scaled_min = wavelen[factors >= factor - 1e-6].min(initial=np.inf)
            original = 8192.0 if kept_max < 8192.0 < scaled_min else math.sqrt(kept_max * scaled_min)
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(round(original)),
    }
    recomputed = llama3_rope_factors(scaling, theta, head_dim)
    if not np.allclose(recomputed, factors, rtol=1e-3, atol=1e-4):
        raise CheckpointError("rope_freqs.weight matches neither linear nor Llama 3 rope scaling")
    return scaling
