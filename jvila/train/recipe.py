"""Training recipes: typed sections read from YAML, with `key.sub=value` overrides from the command line.

A recipe names everything one run needs:

    model:       where the weights start (a checkpoint for `jvila.load`, or `random` with an inline
                 LLMConfig / NVILAConfig dict), the tokenizer of a random model, context extension
    data:        `jvila.data.pipeline.DataConfig` (records, packing length, global batch, seed, ...)
    optimizer:   `jvila.train.optimizer.OptimizerConfig` (AdamW, schedule, clipping, per-module LRs)
    stage:       which parameters train: a stage name ("align", "sft", ...) or a list of glob patterns
    train:       steps, gradient accumulation, remat policy, compute dtype, seed, logging
    mesh:        `sharding.mesh.MeshConfig` axis sizes
    checkpoint:  Orbax CheckpointManager settings (directory, every, keep, async)
    lora:        null, or LoRA-only training of the decoder (rank, alpha, targets)
    output_dir:  TensorBoard events, checkpoints and the exported model go under it

Overrides are `dotted.key=value` with the value parsed as a YAML scalar (`train.steps=20`,
`lora=null`, `stage=[projector.*]`). Every key, in the file or an override, must exist: an unknown
one is a RecipeError naming it and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jvila.config import LLMConfig, RopeConfig
from jvila.vision_config import NVILAConfig, SiglipConfig
from sharding.mesh import MeshConfig
from sharding.remat import POLICIES as REMAT_POLICIES

DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("auto", "reference", "dense")


class RecipeError(ValueError):
    """A recipe that cannot run: unknown keys, wrong types, values out of range."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    init: str = "random"  # "random", or a known model name / checkpoint path that jvila.load opens
    # random: the LLMConfig fields, or the NVILAConfig fields (with `llm` and `vision` dicts) of an NVILA model.
    config: dict | None = None
    # random: a directory of tokenizer files (tokenizer.json, tokenizer_config.json, ...), or "demo"
    # for the demo dataset's tokenizer. A checkpoint brings its own.
    tokenizer: str | None = None
    # random NVILA: the image preprocessor (preprocessor_config.json fields); a checkpoint brings its own.
    preprocessor: dict | None = None
    seed: int = 0  # random initialisation
    # random: the std of every drawn weight matrix (None: the families' 0.02). A narrow model learns
    # faster from a wider draw (the demo's 0.12 at width 64).
    init_std: float | None = None
    # LongVILA context extension: train at this many positions with RoPE theta raised
    # (`jvila.models.long_context.extend_context`: LongVILA's theta for its lengths, else NTK-aware).
    context_length: int | None = None
    rope_theta: float | None = None  # an explicit theta for the extension


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 100
    grad_accum: int = 1
    remat: str = "none"  # a sharding.remat policy: none, full, lightseq, dots
    compute_dtype: str = "float32"  # bfloat16: compute cast inside the step, float32 master weights stay
    seed: int = 0  # dropout and any per-step randomness; one key per step folded from it
    log_every: int = 10
    attention: str = "auto"  # auto: the platform's kernel (cuDNN/Pallas/XLA); reference: plain jnp; dense
    peak_tflops: float | None = None  # per device, for MFU; None: the accelerator's known bf16 dense peak
    progress: bool = True  # a tqdm bar on stderr


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    dir: str | None = None  # default: <output_dir>/checkpoints
    every: int = 1000  # steps between saves (the last step is always saved)
    keep: int = 3  # the newest N are kept
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    data: Any  # jvila.data.pipeline.DataConfig
    optimizer: Any  # jvila.train.optimizer.OptimizerConfig
    stage: str | tuple[str, ...] = "all"
    train: TrainSpec = TrainSpec()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointSpec = CheckpointSpec()
    lora: LoraSpec | None = None
    output_dir: str = "runs/train"
    export: bool = True  # write <output_dir>/export, a directory jvila.load / jvila serve open
    name: str = ""

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return Path(self.output_dir) / "export"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.output_dir) / "tensorboard"

    def model_config(self) -> LLMConfig | NVILAConfig | None:
        """The inline config of a random model (context extension applied); None for a checkpoint."""
        if self.model.init != "random":
            return None
        return model_config_from_dict(self.model.config)


@functools.cache
def _section_types() -> dict[str, type]:
    # Imported when a recipe is read: the sections' dataclasses live with the code that uses them.
    from jvila.data.pipeline import DataConfig
    from jvila.train.optimizer import OptimizerConfig

    return {"data": DataConfig, "optimizer": OptimizerConfig}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides and validate every section."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} is not a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    raw.setdefault("output_dir", str(Path("runs") / path.stem))
    return recipe_from_dict(apply_overrides(raw, overrides))


def recipe_from_dict(raw: dict) -> Recipe:
    for required in ("model", "data", "optimizer"):
        if raw.get(required) is None:
            raise RecipeError(f"recipe has no {required!r} section")
    recipe = _build(Recipe, raw, "", _section_types())
    validate(recipe)
    return recipe


def apply_overrides(raw: dict, overrides) -> dict:
    """A copy of `raw` with each "a.b.c=value" set (the value parsed as YAML); keys are checked later."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"an override is key=value with a dotted key, got {item!r}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: the value is not a YAML scalar or list: {err}") from None
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
            node = child
        node[leaf] = value
    return raw


def _unknown(key: str, path: str, valid) -> RecipeError:
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    where = f"{path}.{key}" if path else key
    hint = f"; did you mean {(path + '.' if path else '') + near[0]!r}?" if near else ""
    return RecipeError(f"unknown recipe key {where!r}{hint} (valid here: {', '.join(valid)})")


def _build(cls, raw, path: str, section_types: dict[str, type] | None = None):
    """A dataclass `cls` from a dict, each key checked against its fields and each value converted."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or 'recipe'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(str(key), path, fields)
        where = f"{path}.{key}" if path else key
        typ = (section_types or {}).get(key, hints[key])
        kwargs[key] = _convert(typ, value, where)
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path or 'recipe'}: {err}") from None


def _convert(typ, value, where: str):
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except RecipeError as err:
                errors.append(err)
        raise errors[-1] if len(options) == 1 else RecipeError(
            f"{where}: {value!r} is none of {', '.join(_type_name(o) for o in options)}")
    if dataclasses.is_dataclass(typ):
        if value is None:
            raise RecipeError(f"{where} must be a mapping, got null")
        return _build(typ, value, where)
    if typ is Any:
        return value
    if origin in (tuple, list) or typ in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if (origin or typ) is list else tuple(items)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if typ is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string: YAML 1.1 floats need one
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is tuple or typ is tuple:
        return "a list"
    return getattr(typ, "__name__", str(typ))


# ----------------------------------------------------------------------------------------------
# Validation (no training, no files read beyond the recipe)
# ----------------------------------------------------------------------------------------------

def validate(recipe: Recipe) -> None:
    """RecipeError for settings that cannot run, found before anything is built."""
    train, ckpt = recipe.train, recipe.checkpoint
    for name, value in (("train.steps", train.steps), ("train.grad_accum", train.grad_accum),
                        ("train.log_every", train.log_every), ("checkpoint.every", ckpt.every),
                        ("checkpoint.keep", ckpt.keep)):
        if value < 1:
            raise RecipeError(f"{name} must be at least 1, got {value}")
    rows = getattr(recipe.data, "global_batch_size", None)
    if rows is not None and rows % train.grad_accum:
        raise RecipeError(f"train.grad_accum {train.grad_accum} does not divide data.global_batch_size {rows} "
                          "(the global batch is split into that many microbatches)")
    _choice("train.remat", train.remat, REMAT_POLICIES)
    _choice("train.compute_dtype", train.compute_dtype, DTYPES)
    _choice("train.attention", train.attention, ATTENTIONS)
    if train.peak_tflops is not None and train.peak_tflops <= 0:
        raise RecipeError(f"train.peak_tflops must be positive, got {train.peak_tflops}")
    model = recipe.model
    if model.init == "random":
        if not model.config:
            raise RecipeError("model.init is 'random': give the architecture as model.config")
        if not model.tokenizer:
            raise RecipeError("model.init is 'random': give model.tokenizer (a tokenizer directory, or 'demo')")
        cfg = model_config_from_dict(model.config)
        if isinstance(cfg, NVILAConfig) and model.preprocessor is None:
            raise RecipeError("a random NVILA model needs model.preprocessor (preprocessor_config.json fields)")
        if model.init_std is not None and not model.init_std > 0:
            raise RecipeError(f"model.init_std must be positive, got {model.init_std}")
    else:
        for key in ("config", "tokenizer", "preprocessor", "init_std"):
            if getattr(model, key) is not None:
                raise RecipeError(f"model.{key} applies to model.init 'random'; {model.init!r} brings its own")
    if model.rope_theta is not None and model.context_length is None:
        raise RecipeError("model.rope_theta applies with model.context_length (the length it is for)")
    if model.context_length is not None and model.context_length < 1:
        raise RecipeError(f"model.context_length must be positive, got {model.context_length}")
    if recipe.lora is not None:
        from jvila.models.lora import AdapterError

        try:
            lora_config(recipe.lora)
        except AdapterError as err:
            raise RecipeError(f"lora: {err}") from None
    try:
        recipe.mesh.sizes(_mesh_device_hint(recipe.mesh))
    except ValueError as err:
        raise RecipeError(f"mesh: {err}") from None
    _validate_stage(recipe.stage)
    if recipe.lora is not None and recipe.stage != "all":
        raise RecipeError("lora trains an adapter over a frozen base model: leave stage at 'all' (its default)")


def _choice(name, value, choices):
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.0)
        raise RecipeError(f"{name} {value!r} is not one of {', '.join(choices)}"
                          + (f"; did you mean {near[0]!r}?" if near else ""))


def _mesh_device_hint(mesh: MeshConfig) -> int:
    # Checked for internal consistency only: the real device count is known when the run starts.
    return max(1, mesh.data) * max(1, mesh.fsdp) * max(1, mesh.sequence) * max(1, mesh.sequence_a2a) * \
        max(1, mesh.tensor)


def _validate_stage(stage) -> None:
    from jvila.train.optimizer import STAGES

    if isinstance(stage, str):
        _choice("stage", stage, tuple(STAGES))
    elif not stage or not all(isinstance(s, str) and s for s in stage):
        raise RecipeError(f"stage must be a stage name or a non-empty list of glob patterns, got {stage!r}")


def model_config_from_dict(d: dict) -> LLMConfig | NVILAConfig:
    """An LLMConfig, or an NVILAConfig when the dict has `llm` and `vision`; unknown keys named."""
    d = dict(d)
    try:
        if "llm" in d or "vision" in d:
            for key in d:
                if key not in {f.name for f in dataclasses.fields(NVILAConfig)}:
                    raise _unknown(key, "model.config", [f.name for f in dataclasses.fields(NVILAConfig)])
            d["llm"] = _llm_config(d.get("llm") or {}, "model.config.llm")
            _check_keys(d.get("vision") or {}, SiglipConfig, "model.config.vision")
            d["vision"] = SiglipConfig.from_dict(d.get("vision") or {})
            d["s2_scales"] = tuple(d.get("s2_scales", NVILAConfig.s2_scales))
            d["video_pool_sizes"] = tuple(tuple(p) for p in d.get("video_pool_sizes", NVILAConfig.video_pool_sizes))
            d["media_end_token_ids"] = tuple(d.get("media_end_token_ids", ()))
            return NVILAConfig(**d)
        return _llm_config(d, "model.config")
    except RecipeError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise RecipeError(f"model.config: {err}") from None


def _llm_config(d: dict, path: str) -> LLMConfig:
    _check_keys(d, LLMConfig, path)
    _check_keys(d.get("rope") or {}, RopeConfig, path + ".rope")
    missing = [f.name for f in dataclasses.fields(LLMConfig)
               if f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise RecipeError(f"{path} lacks {', '.join(missing)}")
    return LLMConfig.from_dict(d)


def _check_keys(d: dict, cls, path: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise _unknown(key, path, names)


def lora_config(spec: LoraSpec):
    from jvila.models.lora import LoraConfig

    return LoraConfig(rank=spec.rank, alpha=spec.alpha, use_rslora=spec.use_rslora, target_modules=spec.targets,
                      dropout=spec.dropout)
