"""Typed model configuration, and its translation to and from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

# Hugging Face architectures this decoder reproduces, by `model_type`.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `kind` is "default", "linear" or "llama3" (the HF `rope_type`)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    # llama3 only: the frequency band that is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """A Llama/Qwen2-style decoder: GQA, RoPE, RMSNorm, SwiGLU."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    out_bias: bool = False  # Llama's `attention_bias` adds a bias to o_proj as well; Qwen2 has none
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    family: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in HF_ARCHITECTURES:
            raise ValueError(f"unknown model family {self.family!r}; known: {sorted(HF_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope.kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling {self.rope.kind!r}; supported: default, linear, llama3")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LLMConfig:
        """Read a Hugging Face `config.json` dict of a Llama or Qwen2 model."""
        family = hf.get("model_type")
        if family not in HF_ARCHITECTURES:
            raise ValueError(f"unknown architecture model_type={family!r}; supported: {sorted(HF_ARCHITECTURES)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            # Qwen2 always has q/k/v bias; Llama has it when `attention_bias` is set.
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=family == "llama" and bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            family=family,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict that `from_pretrained` reads back to the same model."""
        hf = {
            "architectures": [HF_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": _rope_to_hf(self.rope),
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _one_or_list(self.eos_token_ids),
        }
        if self.family == "llama":
            if self.qkv_bias != self.out_bias:
                raise ValueError("Llama's attention_bias covers q/k/v and o_proj together; set both or neither")
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        return hf


def _one_or_list(ids: tuple[int, ...]):
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 moved theta and scaling into `rope_parameters`; older configs use the two keys.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params.update(scaling)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=params["factor"])
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position=params["original_max_position_embeddings"],
        )
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any] | None:
    if rope.kind == "default":
        return None
    if rope.kind == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    return {
        "rope_type": "llama3",
        "factor": rope.factor,
        "low_freq_factor": rope.low_freq_factor,
        "high_freq_factor": rope.high_freq_factor,
        "original_max_position_embeddings": rope.original_max_position,
    }
