"""The jvila checkpoint directory: Orbax params, the model config, and the tokenizer.

Layout:
    DIR/jvila_config.json   LLMConfig as JSON (what the params mean); an NVILA model's is
                            {"kind": "nvila", "config": NVILAConfig as JSON}
    DIR/params/             Orbax PyTree checkpoint of the flat params, nested by dotted path
    DIR/tokenizer/          tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from jvila.checkpoints.atomic import atomic_directory
from jvila.checkpoints.errors import CheckpointError
from jvila.config import LLMConfig
from jvila.vision_config import NVILAConfig

CONFIG_FILE = "jvila_config.json"
NVILA_KIND = "nvila"


def is_jvila_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_checkpoint(dst, cfg: LLMConfig | NVILAConfig, params: dict[str, np.ndarray],
                    tokenizer_files: dict[str, str | bytes], *, overwrite: bool = False) -> Path:
    """Write `cfg` (an LLMConfig or an NVILAConfig), the flat params and the tokenizer files."""
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(_config_to_json(cfg), indent=2))
        checkpointer = ocp.PyTreeCheckpointer()
        checkpointer.save(tmp / "params", _nest(params))
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        for name, content in tokenizer_files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tok_dir / name, mode) as f:
                f.write(content)
    return Path(dst)


def load_checkpoint(src) -> tuple[LLMConfig | NVILAConfig, dict[str, np.ndarray], Path]:
    """(config, flat params as host arrays, tokenizer directory); the config is an NVILAConfig for NVILA."""
    src = Path(src).absolute()
    if not is_jvila_checkpoint(src):
        raise CheckpointError(f"{src} is not a jvila checkpoint (no {CONFIG_FILE})")
    cfg = _config_from_json(json.loads((src / CONFIG_FILE).read_text()))
    restored = ocp.PyTreeCheckpointer().restore(src / "params")
    params = {name: np.asarray(value) for name, value in _flatten(restored).items()}
    return cfg, params, src / "tokenizer"


def _config_to_json(cfg: LLMConfig | NVILAConfig) -> dict:
    return {"kind": NVILA_KIND, "config": cfg.to_dict()} if isinstance(cfg, NVILAConfig) else cfg.to_dict()


def _config_from_json(d: dict) -> LLMConfig | NVILAConfig:
    if d.get("kind") == NVILA_KIND:
        return NVILAConfig.from_dict(d["config"])
    return LLMConfig.from_dict(d)


def read_tokenizer_files(tok_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(tok_dir).iterdir()) if p.is_file()}


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.asarray(value)
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
