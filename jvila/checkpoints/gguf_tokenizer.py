"""The tokenizer embedded in a GGUF file, as HF tokenizer files (tokenizer.json and friends).

GGUF keeps the vocabulary, merges and pre-tokenizer name as metadata; transformers knows how to
rebuild a fast tokenizer from them. That conversion runs once, when a checkpoint is converted, and
its output (tokenizer.json, tokenizer_config.json, chat_template.jinja) is all jvila needs after.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from jvila.checkpoints.errors import CheckpointError

# What transformers writes that a jvila checkpoint keeps.
_KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_files_from_gguf(path: str | os.PathLike, chat_template: str | None = None) -> dict[str, str]:
    """Tokenizer files rebuilt from a GGUF's metadata; `chat_template` fills in a missing template file."""
    path = pathlib.Path(path)
    # Conversion must never reach for the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise CheckpointError(
            "converting a GGUF tokenizer needs transformers (pip install 'jvila[convert]')"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers raises many types for an unconvertible vocabulary
        raise CheckpointError(f"cannot build a tokenizer from {path}: {err}") from err

    files = {}
    with tempfile.TemporaryDirectory() as out_dir:
        tokenizer.save_pretrained(out_dir)
        for name in _KEPT_FILES:
            saved = pathlib.Path(out_dir, name)
            if saved.exists():
                files[name] = saved.read_text(encoding="utf-8")
    if "tokenizer.json" not in files:
        raise CheckpointError(f"the tokenizer of {path} has no fast (tokenizer.json) form")
    # Older transformers keep the template inside tokenizer_config.json; jvila reads it from its own file.
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if "chat_template.jinja" not in files and isinstance(template, str):
        files["chat_template.jinja"] = template
    return files
