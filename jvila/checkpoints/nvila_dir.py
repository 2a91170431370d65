"""Read and write NVILA model directories: the layout VILA's `save_pretrained` writes.

    DIR/config.json     model_type "llava_llama"; the sub-configs inline (llm_cfg, vision_tower_cfg,
                        mm_projector_cfg) and the media settings (image_aspect_ratio, s2_scales, ...)
    DIR/llm/            the causal LM as a Hugging Face directory, with the tokenizer files
    DIR/vision_tower/   SiglipVisionModel (config.json, safetensors) and preprocessor_config.json
    DIR/mm_projector/   config.json (mm_projector_type) and the projector's safetensors

Each part's own config.json is what VILA builds that part from, so it wins over the inline copy.
In jvila the three parts become one flat parameter dict with the NVILA model's child prefixes
(`llm.`, `vision_tower.`, `projector.`); the image preprocessor settings travel with the tokenizer
files as preprocessor_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import tokenizers

from jvila.checkpoints.atomic import atomic_directory
from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.hf_dir import read_hf_dir, read_tokenizer_files_at, write_hf_dir
from jvila.checkpoints.hf_form import HFCheckpoint
from jvila.checkpoints.param_mapping import hf_to_jvila, jvila_to_hf
from jvila.checkpoints.vision_mapping import (
    projector_hf_to_jvila,
    projector_jvila_to_hf,
    siglip_config_for_tensors,
    siglip_hf_to_jvila,
    siglip_jvila_to_hf,
)
from jvila.config import LLMConfig
from jvila.models.nvila import abstract_nvila
from jvila.models.params import check_params, flat_params
from jvila.vision_config import NVILAConfig, SiglipConfig

LLM_DIR, VISION_DIR, PROJECTOR_DIR = "llm", "vision_tower", "mm_projector"
SUBCONFIG_KEYS = {LLM_DIR: "llm_cfg", VISION_DIR: "vision_tower_cfg", PROJECTOR_DIR: "mm_projector_cfg"}
PREPROCESSOR_FILE = "preprocessor_config.json"
LLM_PREFIX = "llm."
# VILA's media tokens (llava/constants.py MEDIA_TOKENS), added to the tokenizer when it loads.
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<vila/video>"
# What VILA's image and video encoders append after every media block (their `end_tokens`).
MEDIA_END_TEXT = "\n"
# The top-level architecture VILA writes for its NVILA models.
NVILA_ARCHITECTURE, NVILA_MODEL_TYPE = "LlavaLlamaModel", "llava_llama"


@dataclasses.dataclass
class NVILACheckpoint:
    """An NVILA directory in memory: the top-level config and each part in Hugging Face form.

    `llm.tokenizer_files` holds the tokenizer; `vision_tower.tokenizer_files` holds
    preprocessor_config.json (the files each folder carries besides its weights).
    """

    config: dict
    llm: HFCheckpoint
    vision_tower: HFCheckpoint
    mm_projector: HFCheckpoint


def is_nvila_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json names the three NVILA parts."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and all(key in config for key in SUBCONFIG_KEYS.values())


def read_nvila_dir(path: str | os.PathLike) -> NVILACheckpoint:
    path = pathlib.Path(path)
    if not is_nvila_dir(path):
        raise CheckpointError(f"{path} is not an NVILA directory: its config.json must name "
                              f"{', '.join(SUBCONFIG_KEYS.values())}")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    missing = [name for name in SUBCONFIG_KEYS if not (path / name).is_dir()]
    if missing:
        raise CheckpointError(f"NVILA directory {path} lacks the subfolder(s) {', '.join(missing)}/ "
                              f"(expected {', '.join(d + '/' for d in SUBCONFIG_KEYS)})")
    llm = read_hf_dir(path / LLM_DIR)
    if "tokenizer.json" not in llm.tokenizer_files:
        # VILA looks for the tokenizer in llm/ and then beside config.json.
        top = read_tokenizer_files_at(path)
        if "tokenizer.json" not in top:
            raise CheckpointError(f"NVILA directory {path} has no tokenizer.json in {LLM_DIR}/ (nor beside "
                                  "config.json); only fast tokenizers are read")
        llm.tokenizer_files = top
    vision = read_hf_dir(path / VISION_DIR)
    preprocessor = path / VISION_DIR / PREPROCESSOR_FILE
    if not preprocessor.is_file():
        raise CheckpointError(f"NVILA directory {path} lacks {VISION_DIR}/{PREPROCESSOR_FILE} "
                              "(the image preprocessing settings)")
    vision.tokenizer_files = {PREPROCESSOR_FILE: preprocessor.read_text(encoding="utf-8")}
    projector = read_hf_dir(path / PROJECTOR_DIR)
    return NVILACheckpoint(config=config, llm=llm, vision_tower=vision, mm_projector=projector)


def write_nvila_dir(ckpt: NVILACheckpoint, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write `ckpt` in VILA's layout; the directory appears only once complete."""
    with atomic_directory(path, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n", encoding="utf-8")
        write_hf_dir(ckpt.llm, staging / LLM_DIR)
        write_hf_dir(ckpt.vision_tower, staging / VISION_DIR)
        write_hf_dir(ckpt.mm_projector, staging / PROJECTOR_DIR)
    return pathlib.Path(path)


def nvila_to_params(ckpt: NVILACheckpoint) -> tuple[NVILAConfig, dict[str, np.ndarray], dict[str, str | bytes]]:
    """(config, flat jvila params, tokenizer files incl. preprocessor_config.json) of an NVILA checkpoint."""
    try:
        llm_cfg = LLMConfig.from_hf(ckpt.llm.config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot read {LLM_DIR}/config.json: {e}") from e
    try:
        # Towers saved without `vision_use_head` (NVILA's) read as having a head: the tensors decide.
        vision_cfg = siglip_config_for_tensors(SiglipConfig.from_hf(ckpt.vision_tower.config),
                                               ckpt.vision_tower.tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {VISION_DIR}/config.json: {e}") from e
    tokenizer_files = with_media_tokens(ckpt.llm.tokenizer_files, llm_cfg.vocab_size)
    tokenizer = tokenizers.Tokenizer.from_str(_text(tokenizer_files["tokenizer.json"]))
    try:
        cfg = NVILAConfig.from_hf(
            ckpt.config, llm=llm_cfg, vision=vision_cfg,
            projector_type=ckpt.mm_projector.config.get("mm_projector_type"),
            image_token_id=tokenizer.token_to_id(IMAGE_TOKEN), video_token_id=tokenizer.token_to_id(VIDEO_TOKEN),
            # VILA embeds the end text as `tokenizer(text).input_ids`, post-processor included.
            media_end_token_ids=tuple(tokenizer.encode(MEDIA_END_TEXT, add_special_tokens=True).ids),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the NVILA config.json: {e}") from e
    params = {LLM_PREFIX + name: value for name, value in hf_to_jvila(ckpt.llm.tensors, llm_cfg).items()}
    params |= siglip_hf_to_jvila(ckpt.vision_tower.tensors, vision_cfg)
    try:
        params |= projector_hf_to_jvila(ckpt.mm_projector.tensors, cfg.projector_type, cfg.mm_hidden_size,
                                        llm_cfg.hidden_size)
    except CheckpointError:
        raise
    except ValueError as e:  # e.g. a projector type jvila does not know
        raise CheckpointError(f"cannot read {PROJECTOR_DIR}/: {e}") from e
    try:
        check_params(flat_params(abstract_nvila(cfg)), params)
    except ValueError as e:
        raise CheckpointError(f"NVILA checkpoint does not fit its config: {e}") from e
    return cfg, params, tokenizer_files | ckpt.vision_tower.tokenizer_files


def params_to_nvila(cfg: NVILAConfig, params: dict[str, np.ndarray],
                    tokenizer_files: dict[str, str | bytes]) -> NVILACheckpoint:
    """The NVILA checkpoint of flat jvila params (the inverse of `nvila_to_params`)."""
    llm_params = {name[len(LLM_PREFIX):]: value for name, value in params.items() if name.startswith(LLM_PREFIX)}
    llm_tensors = jvila_to_hf(llm_params, cfg.llm)
    vision_tensors = siglip_jvila_to_hf(params, cfg.vision)
    projector_tensors = projector_jvila_to_hf(params, cfg.projector_type, cfg.mm_hidden_size, cfg.llm.hidden_size)
    used = len(llm_params) + len(vision_tensors) + len(projector_tensors)
    if used != len(params):
        raise CheckpointError(f"{len(params) - used} jvila params belong to no NVILA part")
    files = dict(tokenizer_files)
    preprocessor = files.pop(PREPROCESSOR_FILE, None)
    if preprocessor is None:
        raise CheckpointError(f"the checkpoint's tokenizer files lack {PREPROCESSOR_FILE}")
    llm_config = cfg.llm.to_hf()
    vision_config = cfg.vision.to_hf()
    projector_config = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                        "mm_projector_type": cfg.projector_type}
    top = {
        "architectures": [NVILA_ARCHITECTURE],
        "model_type": NVILA_MODEL_TYPE,
        "llm_cfg": llm_config,
        "vision_tower_cfg": vision_config,
        "mm_projector_cfg": projector_config,
        **cfg.to_hf(),
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "model_dtype": f"torch.{_dtype_name(llm_tensors)}",
    }
    return NVILACheckpoint(
        config=top,
        llm=HFCheckpoint(llm_config, llm_tensors, files),
        vision_tower=HFCheckpoint(vision_config, vision_tensors, {PREPROCESSOR_FILE: preprocessor}),
        mm_projector=HFCheckpoint(projector_config, projector_tensors),
    )


def with_media_tokens(tokenizer_files: dict[str, str | bytes], vocab_size: int) -> dict[str, str | bytes]:
    """The tokenizer files with VILA's media tokens present (added as special tokens when missing,
    as VILA's tokenizer builder does), checked to fall inside the LLM's embedding."""
    if "tokenizer.json" not in tokenizer_files:
        raise CheckpointError("the NVILA tokenizer files lack tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_str(_text(tokenizer_files["tokenizer.json"]))
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if tokenizer.token_to_id(t) is None]
    files = dict(tokenizer_files)
    if missing:
        tokenizer.add_special_tokens(missing)
        files["tokenizer.json"] = tokenizer.to_str()
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        if tokenizer.token_to_id(token) >= vocab_size:
            raise CheckpointError(f"media token {token} has id {tokenizer.token_to_id(token)}, outside the LLM's "
                                  f"{vocab_size}-row embedding")
    return files


def _dtype_name(tensors: dict[str, np.ndarray]) -> str:
    return np.asarray(next(iter(tensors.values()))).dtype.name


def _text(content: str | bytes) -> str:
    return content.decode("utf-8") if isinstance(content, bytes) else content
