"""Read a llama.cpp GGUF file (llama or qwen2 architecture) into Hugging Face form.

Every tensor is dequantized to float32, renamed to its HF name and, for llama, has the rotary row
order that llama.cpp's converter introduces undone, so the result equals the HF checkpoint the GGUF
was made from up to quantization error.
"""

from __future__ import annotations

import os
import pathlib
import re

import gguf
import numpy as np

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.gguf_config import hf_config_from_gguf, read_metadata
from jvila.checkpoints.gguf_tokenizer import tokenizer_files_from_gguf
from jvila.checkpoints.hf_form import HFCheckpoint, check_tensor_shapes

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3's rope scaling, stored as a tensor; it becomes `rope_scaling` in the config.
_ROPE_FREQS = "rope_freqs.weight"


def read_gguf(path: str | os.PathLike, *, with_tokenizer: bool = True) -> HFCheckpoint:
    """The HF config, float32 state dict and (if `with_tokenizer`) tokenizer files of a GGUF file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct.error, ... on a corrupt header
        raise CheckpointError(f"{path} is not a readable GGUF file: {err}") from err

    metadata = read_metadata(reader)
    shapes = {t.name: numpy_shape(t) for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize_tensor(by_name[_ROPE_FREQS]) if _ROPE_FREQS in by_name else None
    config = hf_config_from_gguf(metadata, shapes, rope_freqs)

    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        hf_name = hf_tensor_name(tensor.name)
        values = dequantize_tensor(tensor)
        if metadata["general.architecture"] == "llama":
            values = _undo_llama_permutation(hf_name, values, config)
        tensors[hf_name] = values

    tokenizer_files = {}
    if with_tokenizer and "tokenizer.ggml.model" in reader.fields:
        tokenizer_files = tokenizer_files_from_gguf(path, metadata.get("tokenizer.chat_template"))
    ckpt = HFCheckpoint(config=config, tensors=tensors, tokenizer_files=tokenizer_files)
    check_tensor_shapes(ckpt, require_all=True)
    return ckpt


def hf_tensor_name(gguf_name: str) -> str:
    """The HF state-dict name of a llama/qwen2 GGUF tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise CheckpointError(f"GGUF tensor {gguf_name} has no Hugging Face counterpart in a llama/qwen2 model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def numpy_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    # ggml lists dimensions fastest-first; numpy (and HF) list them slowest-first.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as a fresh float32 array in numpy dimension order."""
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        values = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError as err:
        raise CheckpointError(
            f"GGUF tensor {tensor.name} has type {kind.name}, which is not a dequantizable weight type"
        ) from err
    # The reader hands out views of the memory-mapped file: copy so the arrays outlive it.
    return np.array(values, dtype=np.float32).reshape(numpy_shape(tensor))


def _undo_llama_permutation(hf_name: str, values: np.ndarray, config: dict) -> np.ndarray:
    if ".self_attn.q_proj." in hf_name:
        return undo_rope_permutation(values, config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return undo_rope_permutation(values, config["num_key_value_heads"])
    return values


def undo_rope_permutation(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of a GGUF llama q/k projection (or bias) back in HF order.

    HF rotates each head's first half of dimensions against its second half; llama.cpp rotates
    adjacent pairs, so its converter reorders each head's rows from [x0..xn, y0..yn] to
    [x0, y0, x1, y1, ...]. Viewing a head's rows as (pair, 2) and transposing restores the halves.
    """
    rows = values.shape[0]
    if rows % (2 * num_heads):
        raise CheckpointError(f"{rows} projection rows do not split into {num_heads} heads of rotary pairs")
    half = rows // num_heads // 2
    return values.reshape(num_heads, half, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)
