"""`jvila convert`: GGUF, Hugging Face or NVILA directory → jvila Orbax checkpoint, and back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.hf_form import HFCheckpoint
from jvila.checkpoints.orbax_io import is_jvila_checkpoint, load_checkpoint, read_tokenizer_files, save_checkpoint
from jvila.checkpoints.param_mapping import hf_to_jvila, jvila_to_hf
from jvila.config import LLMConfig
from jvila.models.params import abstract_model, check_params, flat_params


def read_source(src: str | os.PathLike) -> HFCheckpoint:
    """A GGUF file or an HF model directory, in Hugging Face form."""
    from jvila.checkpoints.gguf_reader import read_gguf
    from jvila.checkpoints.hf_dir import read_hf_dir

    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"source {src} does not exist")
    if src.is_file():
        if src.suffix != ".gguf":
            raise CheckpointError(f"source file {src} is not a .gguf file; pass a GGUF file or a model directory")
        return read_gguf(src)
    return read_hf_dir(src)


def hf_to_params(ckpt: HFCheckpoint) -> tuple[LLMConfig, dict[str, np.ndarray]]:
    """Config and flat jvila params of an HF-form checkpoint, checked against the model's shapes."""
    try:
        cfg = LLMConfig.from_hf(ckpt.config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot read the model config: {e}") from e
    params = hf_to_jvila(ckpt.tensors, cfg)
    try:
        check_params(flat_params(abstract_model(cfg)), params)
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not fit its config: {e}") from e
    return cfg, params


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Convert SRC into DST; returns a one-line description of what was written.

    A jvila checkpoint SRC becomes an HF directory (an NVILA directory for an NVILA model);
    anything else (GGUF, HF or NVILA directory) becomes a jvila checkpoint. Tensor dtypes are kept
    (GGUF's quantized tensors become float32).
    """
    from jvila.checkpoints.hf_dir import write_hf_dir
    from jvila.checkpoints.nvila_dir import (
        is_nvila_dir,
        nvila_to_params,
        params_to_nvila,
        read_nvila_dir,
        write_nvila_dir,
    )
    from jvila.vision_config import NVILAConfig

    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it")
    if is_nvila_dir(src):
        cfg, params, tokenizer_files = nvila_to_params(read_nvila_dir(src))
        save_checkpoint(dst, cfg, params, tokenizer_files, overwrite=overwrite)
        return (f"wrote jvila checkpoint {dst} (NVILA: {cfg.llm.family} {cfg.llm.num_layers} layers, SigLIP "
                f"{cfg.vision.num_layers} layers, {cfg.projector_type}; {len(params)} tensors)")
    if is_jvila_checkpoint(src):
        cfg, params, tok_dir = load_checkpoint(src)
        if isinstance(cfg, NVILAConfig):
            write_nvila_dir(params_to_nvila(cfg, params, read_tokenizer_files(tok_dir)), dst, overwrite=overwrite)
            return f"wrote NVILA directory {dst} ({cfg.llm.family}, {cfg.projector_type})"
        ckpt = HFCheckpoint(cfg.to_hf(), jvila_to_hf(params, cfg), read_tokenizer_files(tok_dir))
        write_hf_dir(ckpt, dst, overwrite=overwrite)
        return f"wrote Hugging Face directory {dst} ({cfg.family}, {cfg.num_layers} layers)"
    ckpt = read_source(src)
    cfg, params = hf_to_params(ckpt)
    save_checkpoint(dst, cfg, params, ckpt.tokenizer_files, overwrite=overwrite)
    return f"wrote jvila checkpoint {dst} ({cfg.family}, {cfg.num_layers} layers, {len(params)} tensors)"
