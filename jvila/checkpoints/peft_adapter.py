"""Hugging Face PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores, per targeted linear layer, `...layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
`lora_B.weight` [out, r] (torch's [out, in] convention), scaled by lora_alpha / r (or / sqrt(r)
with use_rslora). jvila's `Adapter` holds A [in, r] and B [r, out] in the same flat layout, so a
conversion is a transpose. Only what this decoder can reproduce exactly is accepted; anything
else (DoRA, per-module rank or alpha patterns, trained biases, extra saved modules, embedding or
lm_head adapters) is refused with a message naming it, rather than silently dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jvila.checkpoints.atomic import atomic_directory
from jvila.config import LLMConfig
from jvila.models.lora import ATTENTION_MODULES, TARGET_MODULES, Adapter, AdapterError, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT's key for a decoder layer's LoRA matrix; an adapter name (".default") may sit before ".weight".
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def _block(module: str) -> str:
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    if not config_file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}; a PEFT adapter directory holds it and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} must hold a JSON object")
    return config


def _lora_config(config: dict, config_file: Path, found_modules: set[str]) -> LoraConfig:
    """The adapter's LoraConfig, after refusing every PEFT option this decoder does not reproduce."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{config_file}: peft_type {peft_type!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise AdapterError(f"{config_file}: PEFT options {bad} are not supported")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise AdapterError(f"{config_file} lacks {field!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        # A regex or "all-linear": the weights present say which modules it matched.
        modules = tuple(m for m in TARGET_MODULES if m in found_modules)
    elif isinstance(targets, list):
        short = [t.rsplit(".", 1)[-1] for t in targets]
        unknown = sorted(set(short) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"{config_file}: unknown LoRA target modules {unknown}; "
                               f"supported: {list(TARGET_MODULES)}")
        modules = tuple(m for m in TARGET_MODULES if m in short)
    else:
        raise AdapterError(f"{config_file}: target_modules must be a list or a string, got {targets!r}")
    try:
        return LoraConfig(rank=config["r"], alpha=float(config["lora_alpha"]),
                          use_rslora=bool(config.get("use_rslora", False)), target_modules=modules,
                          dropout=float(config.get("lora_dropout", 0.0) or 0.0))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{config_file}: {e}") from e


def load_peft(path, base_config: LLMConfig, *, max_rank: int | None = None) -> Adapter:
    """Read a PEFT LoRA directory for a decoder with `base_config`; AdapterError on anything that does not fit."""
    path = Path(path)
    config = _read_config(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        extra = " (adapter_model.bin is not read: save with safe_serialization)" if (
            path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{extra}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise AdapterError(f"{weights_file} cannot be read as safetensors: {e}") from e
    pieces: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix of a decoder layer's "
                               f"projection ({', '.join(TARGET_MODULES)})")
        layer, block, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in TARGET_MODULES or block != _block(module):
            raise AdapterError(f"{weights_file}: tensor {key!r} targets an unknown module {block}.{module}")
        pieces.setdefault(layer, {}).setdefault(module, {})[which] = value
    if not pieces:
        raise AdapterError(f"{weights_file} holds no LoRA weights")
    found = {m for modules in pieces.values() for m in modules}
    lora_config = _lora_config(config, path / CONFIG_FILE, found)
    if max_rank is not None and lora_config.rank > max_rank:
        raise AdapterError(f"{path}: rank {lora_config.rank} is above the maximum rank {max_rank}")
    weights = {}
    for layer, modules in sorted(pieces.items()):
        weights[layer] = {}
        for module, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{weights_file}: layer {layer} {module} has lora_{next(iter(ab))} but not its pair")
            a, b = np.asarray(ab["A"], np.float32).T, np.asarray(ab["B"], np.float32).T
            weights[layer][module] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    extra = sorted(found - set(lora_config.target_modules))
    if extra:
        raise AdapterError(f"{weights_file} has weights for {extra}, which target_modules does not list")
    return Adapter(lora_config, weights).check(base_config)


def save_peft(adapter: Adapter, path, base_model_name: str | None = None, *, overwrite: bool = False) -> Path:
    """Write `adapter` as a PEFT LoRA directory (float32) that `peft.PeftModel.from_pretrained` loads."""
    cfg = adapter.config
    tensors = {}
    for layer, modules in adapter.weights.items():
        for module, (a, b) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{_block(module)}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    if not tensors:
        raise AdapterError("the adapter has no weights to save")
    layers = sorted(adapter.weights)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.use_rslora,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        # An adapter on only some layers says which (elsewhere PEFT would add fresh, zero-B ones: harmless, but noisy).
        "layers_to_transform": None if layers == list(range(len(layers))) else layers,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(path)

