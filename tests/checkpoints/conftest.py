"""Fixtures for checkpoint tests: tiny random HF models, a GGUF writer in llama.cpp's layout, SmolLM2."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jvila.checkpoints.known_models import resolve_gguf  # noqa: E402
from tiny_hf import build_tiny_model  # noqa: E402

# HF → GGUF names, written out independently of the reader's table.
_GGUF_BLOCK_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    globals_ = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK_PARTS[part]}.{kind}"


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's [first half, second half] rows become interleaved pairs."""
    return rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(
        rows.shape
    )


def write_gguf(
    path,
    state: dict[str, np.ndarray],
    config: dict,
    *,
    arch: str,
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> None:
    """Write an HF state dict as llama.cpp's converter would: GGUF names, permuted q/k, chosen types."""
    types = types or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    # transformers 5 nests theta in `rope_parameters`; older configs keep it at the top level.
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, values in state.items():
        values = np.asarray(values, dtype=np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            values = llama_cpp_permute(values, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            values = llama_cpp_permute(values, config["num_key_value_heads"])
        kind = types.get(hf_name, gguf.GGMLQuantizationType.F32)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf_name), values)
        else:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(values, kind), raw_dtype=kind)
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def smollm2_gguf():
    return resolve_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """The real SmolLM2 GGUF in HF form, read once (dequantizing and converting its tokenizer takes seconds)."""
    from jvila.checkpoints.gguf_reader import read_gguf

    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer_files(smollm2_checkpoint):
    return smollm2_checkpoint.tokenizer_files


# Helpers reach the tests as fixtures, so no test module imports this conftest by name.
@pytest.fixture
def make_tiny_model():
    return build_tiny_model


@pytest.fixture
def make_gguf():
    return write_gguf
