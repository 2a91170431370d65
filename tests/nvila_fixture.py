"""A tiny synthetic NVILA checkpoint in VILA's directory layout, and a PyTorch reference for it.

VILA's `save_pretrained` writes one directory per part beside a top-level config.json:

    DIR/config.json        model_type "llava_llama", architectures ["LlavaLlamaModel"], the three
                           sub-configs (llm_cfg, vision_tower_cfg, mm_projector_cfg) inline, and the
                           media settings (image_aspect_ratio, s2_scales "448,896,1344", ...)
    DIR/llm/               the Qwen2 causal LM (config.json, safetensors) and the tokenizer files
    DIR/vision_tower/      SiglipVisionModel (config.json, safetensors) and preprocessor_config.json
    DIR/mm_projector/      config.json (model_type "v2l_projector", mm_projector_type) and the
                           projector's safetensors, named as its nn.Sequential: layers.1.weight, ...

Here every part is a transformers (or torch) module with tiny shapes and every weight random, so
that nothing goes unchecked, and the reference forward is assembled from those same modules:
SigLIP hidden_states[-2] → (Dynamic-S2 merge) → projector → "\\n" embedding appended → spliced
into Qwen2's inputs_embeds at the media placeholders → logits. The reference follows VILA's
llava_arch.py (encode_images, merge_features_for_dynamic_s2) but is written independently here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F
import transformers

from tiny_hf import randomize

from jvila.data.demo_shapes import bpe_tokenizer_files

IMAGE_TOKEN, VIDEO_TOKEN, SENTINEL_TOKEN = "<image>", "<vila/video>", "<vila/sentinel>"
# VILA's qwen2.jinja as its tokenizer builder stores it (indentation and line breaks stripped).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "You are a helpful assistant. Describe the image in one sentence.",
    "What is in this picture? A cat sits on a red chair next to the window.",
    "The quick brown fox jumps over the lazy dog.\n",
    "Summarize the video: people walk along a beach at sunset, waves roll in.\n",
    "How many apples are on the table? There are three green apples.",
]

# Tiny shapes that divide nothing in particular. Tiles are 28 px with 7 px patches (4×4 feature
# maps, so the 2×2 spatial-to-channel step has work to do); the S2 scales keep VILA's 1:2:3 ratios.
TILE = 28
S2_SCALES = (TILE, 2 * TILE, 3 * TILE)


def build_tokenizer_files(seed_corpus: list[str] = _CORPUS) -> dict[str, str]:
    """A byte-level BPE tokenizer with Qwen2's chat tokens, VILA's qwen2 template and media tokens, offline."""
    return bpe_tokenizer_files(seed_corpus, vocab_size=320, chat_template=CHAT_TEMPLATE)


@dataclasses.dataclass
class NVILAParts:
    """The torch modules of one synthetic NVILA model and the settings its config.json carries."""

    llm: transformers.Qwen2ForCausalLM
    vision: transformers.SiglipVisionModel
    projector: torch.nn.Sequential
    projector_type: str
    tokenizer_files: dict[str, str]
    image_aspect_ratio: str
    s2_scales: tuple[int, ...]
    num_video_frames: int = 8

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.Tokenizer.from_str(self.tokenizer_files["tokenizer.json"])

    @property
    def mm_hidden_size(self) -> int:
        scales = len(self.s2_scales) if self.image_aspect_ratio == "dynamic_s2" else 1
        return self.vision.config.hidden_size * scales


def build_projector(projector_type: str, mm_hidden: int, hidden: int) -> torch.nn.Sequential:
    """VILA's projector layer stacks (base_projector.py); index 0, the spatial-to-channel step, has no weights."""
    if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        layers = [torch.nn.Identity(), torch.nn.LayerNorm(4 * mm_hidden), torch.nn.Linear(4 * mm_hidden, hidden),
                  torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]
    elif projector_type == "mlp_downsample_3x3_fix":
        layers = [torch.nn.Identity(), torch.nn.LayerNorm(9 * mm_hidden), torch.nn.Linear(9 * mm_hidden, 3 * mm_hidden),
                  torch.nn.GELU(), torch.nn.LayerNorm(3 * mm_hidden), torch.nn.Linear(3 * mm_hidden, hidden),
                  torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]
    else:
        raise ValueError(f"the fixture builds no {projector_type!r} projector")
    return torch.nn.Sequential(*layers)


def build_nvila_parts(*, projector_type: str = "mlp_downsample_2x2_fix", image_aspect_ratio: str = "dynamic_s2",
                      tie_embeddings: bool = False, seed: int | None = None) -> NVILAParts:
    """Random tiny Qwen2 + SigLIP + projector. No seed: fresh weights each run."""
    seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    tokenizer_files = build_tokenizer_files()
    vocab = tokenizers.Tokenizer.from_str(tokenizer_files["tokenizer.json"]).get_vocab_size(with_added_tokens=True)
    llm_config = transformers.Qwen2Config(
        vocab_size=vocab + 13,  # like Qwen2, an embedding larger than the tokenizer
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=1e6, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=tie_embeddings,
        eos_token_id=tokenizers.Tokenizer.from_str(tokenizer_files["tokenizer.json"]).token_to_id("<|im_end|>"))
    llm = randomize(transformers.Qwen2ForCausalLM(llm_config), seed)
    vision_config = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=TILE,
        patch_size=7, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    vision = randomize(transformers.SiglipVisionModel(vision_config), seed + 1)
    scales = len(S2_SCALES) if image_aspect_ratio == "dynamic_s2" else 1
    projector = build_projector(projector_type, vision_config.hidden_size * scales, llm_config.hidden_size)
    randomize(projector, seed + 2)
    return NVILAParts(llm.eval(), vision.eval(), projector.eval(), projector_type, tokenizer_files,
                      image_aspect_ratio, S2_SCALES)


def _save_module(module_state: dict, config: dict, directory: pathlib.Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.detach().contiguous() for name, t in module_state.items()}
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def vila_vision_state(vision: transformers.SiglipVisionModel) -> dict[str, torch.Tensor]:
    """The tower's state dict under the names VILA's checkpoints use."""
    return {name if name.startswith("vision_model.") else f"vision_model.{name}": value
            for name, value in vision.state_dict().items()}


def preprocessor_config() -> dict:
    """transformers' SiglipImageProcessor settings at the tile size."""
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": TILE, "width": TILE}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def write_nvila_dir(parts: NVILAParts, path) -> pathlib.Path:
    """Write `parts` as VILA's save_pretrained lays a model out."""
    path = pathlib.Path(path)
    path.mkdir(parents=True)
    llm_cfg = parts.llm.config.to_dict() | {"architectures": ["Qwen2ForCausalLM"], "_name_or_path": str(path / "llm")}
    llm_state = dict(parts.llm.state_dict())
    if parts.llm.config.tie_word_embeddings:  # a tied head is stored once, as transformers does
        llm_state.pop("lm_head.weight")
    _save_module(llm_state, llm_cfg, path / "llm")
    for name, content in parts.tokenizer_files.items():
        (path / "llm" / name).write_text(content)
    vision_cfg = parts.vision.config.to_dict() | {"architectures": ["SiglipVisionModel"],
                                                  "_name_or_path": str(path / "vision_tower")}
    # VILA (transformers 4) names the tower's tensors `vision_model.*`; transformers 5 drops the prefix.
    _save_module(vila_vision_state(parts.vision), vision_cfg, path / "vision_tower")
    (path / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))
    projector_cfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                     "mm_projector_type": parts.projector_type, "_name_or_path": str(path / "mm_projector")}
    _save_module({f"layers.{k}": v for k, v in parts.projector.state_dict().items()}, projector_cfg,
                 path / "mm_projector")
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": llm_cfg,
        "vision_tower_cfg": vision_cfg,
        "mm_projector_cfg": projector_cfg,
        "hidden_size": parts.llm.config.hidden_size,
        "mm_hidden_size": parts.mm_hidden_size,
        "image_aspect_ratio": parts.image_aspect_ratio,
        "dynamic_s2": parts.image_aspect_ratio == "dynamic_s2",
        "s2": False,
        "s2_scales": ",".join(str(s) for s in parts.s2_scales),
        "s2_max_split_size": parts.s2_scales[0],
        "s2_resize_output_to_scale_idx": -1,
        "min_tiles": 1,
        "max_tiles": 12,
        "num_video_frames": parts.num_video_frames,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "model_dtype": "torch.float32",
        "image_encoder": '{"_target_": "llava.model.encoders.BasicImageEncoder"}',
        "video_encoder": '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}',
        "resume_path": str(path),
    }
    (path / "config.json").write_text(json.dumps(top, indent=2))
    return path


# ---- the PyTorch reference --------------------------------------------------------------------


def spatial_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, H, W, C] → [n, ⌈H/k⌉, ⌈W/k⌉, k·k·C]: zero-pad to multiples of k, then each k×k window's
    pixels go to channels row-major (VILA's flat_square_2x2 / flat_square_3x3)."""
    n, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, -w % k, 0, -h % k))
    h, w = x.shape[1:3]
    return x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // k, w // k, k * k * c)


def project(parts: NVILAParts, features: torch.Tensor) -> torch.Tensor:
    """[n, tokens, mm_hidden] square feature maps → [n, tokens', hidden] through the projector."""
    n, tokens, c = features.shape
    side = int(round(tokens**0.5))
    k = 3 if "3x3" in parts.projector_type else 2
    x = spatial_to_channel(features.reshape(n, side, side, c), k)
    return parts.projector(x.reshape(n, -1, x.shape[-1]))


def vision_features(parts: NVILAParts, tiles_nhwc: np.ndarray) -> torch.Tensor:
    """Tiles [n, H, W, 3] (normalized pixels) → SigLIP hidden_states[-2], [n, patches, width]."""
    pixels = torch.from_numpy(np.ascontiguousarray(tiles_nhwc.transpose(0, 3, 1, 2))).float()
    return parts.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _feature_map(features: torch.Tensor) -> torch.Tensor:  # [n, side², C] → [n, C, side, side]
    n, tokens, c = features.shape
    side = int(round(tokens**0.5))
    return features.reshape(n, side, side, c).permute(0, 3, 1, 2)


def _stitch(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tile maps [rows·cols, C, h, w] in row-major order → one map [1, C, rows·h, cols·w]."""
    grid = [torch.cat(list(maps[r * cols:(r + 1) * cols]), dim=-1) for r in range(rows)]
    return torch.cat(grid, dim=-2)[None]


def _cut(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One map [1, C, H, W] → rows·cols blocks [rows·cols, C, H/rows, W/cols], row-major."""
    h, w = x.shape[2] // rows, x.shape[3] // cols
    return torch.cat([x[:, :, r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)])


def image_block_dynamic_s2(parts: NVILAParts, tiles_nhwc: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """One Dynamic-S2 image: tiles in scale order (1, 2×2, ..., the last scale's grid) → [tokens + 1, hidden]."""
    feats = vision_features(parts, tiles_nhwc)
    maps, start = [], 0
    for scale in parts.s2_scales[:-1]:
        side = scale // parts.s2_scales[0]
        maps.append(_stitch(_feature_map(feats[start:start + side * side]), side, side))
        start += side * side
    rows, cols = grid
    maps.append(_stitch(_feature_map(feats[start:start + rows * cols]), rows, cols))
    assert start + rows * cols == len(feats), "tile count does not match the grid"
    size = maps[-1].shape[-2:]
    merged = torch.cat([F.interpolate(m, size=size, mode="area") for m in maps], dim=1)
    blocks = _cut(merged, rows, cols)
    projected = project(parts, blocks.flatten(2).transpose(1, 2))  # [blocks, tokens', hidden]
    side = int(round(projected.shape[1] ** 0.5))
    block_maps = projected.reshape(len(blocks), side, side, -1).permute(0, 3, 1, 2)
    return torch.cat([_stitch(block_maps, rows, cols)[0].flatten(1).T, newline_embedding(parts)])


def _single_tile_features(parts: NVILAParts, tiles_nhwc: np.ndarray) -> torch.Tensor:
    feats = vision_features(parts, tiles_nhwc)
    if parts.image_aspect_ratio == "dynamic_s2":  # a lone tile's features stand in for every scale
        feats = feats.repeat(1, 1, len(parts.s2_scales))
    return project(parts, feats)


def image_block_single_tile(parts: NVILAParts, tile_nhwc: np.ndarray) -> torch.Tensor:
    """One tile [1, H, W, 3] → [tokens + 1, hidden]."""
    return torch.cat([_single_tile_features(parts, tile_nhwc)[0], newline_embedding(parts)])


def video_block(parts: NVILAParts, frames_nhwc: np.ndarray, pool: int = 8) -> torch.Tensor:
    """Frames → each group of `pool` consecutive frames averaged (after the projector, as VILA's TSP
    encoder does), each group followed by "\n": [groups · (tokens + 1), hidden]."""
    projected = _single_tile_features(parts, frames_nhwc)
    groups = projected.reshape(-1, pool, *projected.shape[1:]).mean(dim=1)
    newline = newline_embedding(parts)
    return torch.cat([torch.cat([g, newline]) for g in groups])


def newline_embedding(parts: NVILAParts) -> torch.Tensor:
    ids = parts.tokenizer.encode("\n").ids
    return parts.llm.get_input_embeddings()(torch.tensor(ids))


def splice(parts: NVILAParts, token_ids: list[int], blocks: list[torch.Tensor]) -> torch.Tensor:
    """inputs_embeds [L', hidden]: each media placeholder, in order, replaced by its whole block."""
    media_ids = {parts.tokenizer.token_to_id(IMAGE_TOKEN), parts.tokenizer.token_to_id(VIDEO_TOKEN)}
    embed = parts.llm.get_input_embeddings()
    pieces, blocks = [], list(blocks)
    for token in token_ids:
        pieces.append(blocks.pop(0) if token in media_ids else embed(torch.tensor([token])))
    assert not blocks, "more media blocks than placeholders"
    return torch.cat(pieces)


@torch.no_grad()
def reference_logits(parts: NVILAParts, inputs_embeds: torch.Tensor) -> np.ndarray:
    return parts.llm(inputs_embeds=inputs_embeds[None]).logits[0].float().numpy()


@torch.no_grad()
def reference_greedy(parts: NVILAParts, inputs_embeds: torch.Tensor, steps: int, stop_ids=()) -> list[int]:
    """Greedy decoding by re-running the whole forward for each new token (no cache to get wrong)."""
    out, embeds = [], inputs_embeds
    for _ in range(steps):
        token = int(parts.llm(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        embeds = torch.cat([embeds, parts.llm.get_input_embeddings()(torch.tensor([token]))])
    return out


# ---- media files for tests ------------------------------------------------------------------------


def write_random_image(path, width: int, height: int, rng: np.random.Generator) -> pathlib.Path:
    """A PNG of random pixels."""
    import PIL.Image

    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return pathlib.Path(path)


def write_random_video(path, num_frames: int, rng: np.random.Generator, width: int = 46, height: int = 34):
    """An MPEG-4 video of random frames, written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return pathlib.Path(path)
