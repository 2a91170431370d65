"""Typed configuration of the vision side: the SigLIP tower and an NVILA model around an LLM.

`SiglipConfig` translates to and from a Hugging Face `SiglipVisionConfig` dict (the NVILA
`vision_tower/config.json`). `NVILAConfig` holds what the top-level NVILA `config.json` says about
media: the projector type, which ViT layer is read, Dynamic-S2 scales, tiling and video pooling.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jvila.config import LLMConfig

# Activations a SigLIP tower may name, and whether each is the tanh approximation of GELU.
SIGLIP_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}

IMAGE_ASPECT_RATIOS = ("dynamic_s2", "resize", "dynamic")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """A SigLIP vision transformer (pre-LN, no class token)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # The attention-pooling head: never run for NVILA, kept (when a checkpoint has it) for round trips.
    use_head: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in SIGLIP_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(SIGLIP_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of an `image_size` input."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiglipConfig:
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> SiglipConfig:
        """Read a Hugging Face SigLIP vision `config.json` dict (or a full SigLIP config's vision part)."""
        if "vision_config" in hf:
            hf = hf["vision_config"]
        if hf.get("num_channels", 3) != 3:
            raise ValueError(f"SigLIP towers with {hf['num_channels']} input channels are not supported (need 3)")
        return cls(
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 16),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
            # transformers' default is True; PaliGemma-style towers (NVILA's) set it False.
            use_head=bool(hf.get("vision_use_head", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' `SiglipVisionModel` reads back to the same tower."""
        return {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_dropout": 0.0,
            "vision_use_head": self.use_head,
        }


@dataclasses.dataclass(frozen=True)
class NVILAConfig:
    """An NVILA model: LLM + SigLIP tower + multimodal projector, and how media become tokens."""

    llm: LLMConfig
    vision: SiglipConfig
    projector_type: str = "mlp_downsample_2x2_fix"
    select_layer: int = -2  # index into the tower's hidden states (embeddings output first)
    # How processing shapes images: "dynamic_s2" (NVILA), "dynamic" (NVILA-Lite tiles), "resize".
    image_aspect_ratio: str = "dynamic_s2"
    # Whether the model was trained with Dynamic-S2 features (channels = width x scales). A model
    # fine-tuned on "resize" from a Dynamic-S2 one keeps it: its single tiles repeat their features
    # once per scale on channels, as VILA's `merge_features_for_dynamic_s2` does for them.
    dynamic_s2: bool = True
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    s2_max_split_size: int = 448
    s2_resize_output_to_scale_idx: int = -1
    min_tiles: int = 1
    max_tiles: int = 12
    # TSP temporal pooling windows (frames, rows, cols) over projected video features; empty = none
    # (VILA's BasicVideoEncoder: every frame its own block).
    video_pool_sizes: tuple[tuple[int, int, int], ...] = ((8, 1, 1),)
    num_video_frames: int = 8
    image_token_id: int = 0
    video_token_id: int = 0
    # Token ids whose embeddings close every media block (the tokenizer's ids of "\n").
    media_end_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {self.image_aspect_ratio!r}; known: {IMAGE_ASPECT_RATIOS}")
        if self.image_aspect_ratio == "dynamic_s2" and not self.dynamic_s2:
            raise ValueError("image_aspect_ratio 'dynamic_s2' needs a model with dynamic_s2 features")
        if self.dynamic_s2:
            scales = self.s2_scales
            if not scales or list(scales) != sorted(scales) or any(s % scales[0] for s in scales):
                raise ValueError(f"s2_scales {scales} must be ascending multiples of the first scale")
            if scales[0] != self.vision.image_size:
                raise ValueError(f"the first S2 scale {scales[0]} must equal the tower's image_size "
                                 f"{self.vision.image_size}")
            if not -len(scales) <= self.s2_resize_output_to_scale_idx < len(scales):
                raise ValueError(f"s2_resize_output_to_scale_idx {self.s2_resize_output_to_scale_idx} is out of "
                                 f"range for {len(scales)} scales")
        for pool in self.video_pool_sizes:
            if len(pool) != 3 or min(pool) < 1:
                raise ValueError(f"video pool size {pool} must be three positive ints (frames, rows, cols)")
        if not -(self.vision.num_layers + 1) <= self.select_layer <= self.vision.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is out of range for {self.vision.num_layers} layers")

    @property
    def mm_hidden_size(self) -> int:
        """Channels the projector takes: the tower width, times the number of S2 scales under Dynamic-S2."""
        return self.vision.hidden_size * (len(self.s2_scales) if self.dynamic_s2 else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NVILAConfig:
        d = dict(d)
        d["llm"] = LLMConfig.from_dict(d["llm"])
        d["vision"] = SiglipConfig.from_dict(d["vision"])
        d["s2_scales"] = tuple(d.get("s2_scales", ()))
        d["video_pool_sizes"] = tuple(tuple(p) for p in d.get("video_pool_sizes", ()))
        d["media_end_token_ids"] = tuple(d.get("media_end_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, top: dict[str, Any], *, llm: LLMConfig, vision: SiglipConfig, projector_type: str | None = None,
                image_token_id: int, video_token_id: int, media_end_token_ids: tuple[int, ...]) -> NVILAConfig:
        """Read the top-level NVILA `config.json` dict; the sub-model configs and token ids come from
        their own files. `projector_type` overrides the one found in `mm_projector_cfg`."""
        if projector_type is None:
            proj = top.get("mm_projector_cfg") or {}
            projector_type = proj.get("mm_projector_type") if isinstance(proj, dict) else None
            projector_type = projector_type or top.get("mm_projector") or top.get("mm_projector_type")
        if not projector_type:
            raise ValueError("NVILA config names no mm_projector_type")
        scales = top.get("s2_scales") or "448,896,1344"
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",")]
        aspect = top.get("image_aspect_ratio") or "resize"
        dynamic_s2 = bool(top.get("dynamic_s2", aspect == "dynamic_s2"))
        select_feature = top.get("mm_vision_select_feature", "cls_patch")
        if select_feature != "cls_patch":
            # "patch" drops a class token SigLIP does not have: VILA would drop a real patch.
            raise ValueError(f"mm_vision_select_feature {select_feature!r} is not supported (SigLIP needs cls_patch)")
        cfg = cls(
            llm=llm,
            vision=vision,
            projector_type=projector_type,
            select_layer=int(top.get("mm_vision_select_layer", -2)),
            image_aspect_ratio=aspect,
            dynamic_s2=dynamic_s2,
            s2_scales=tuple(sorted(int(s) for s in scales)),
            s2_max_split_size=int(top.get("s2_max_split_size") or scales[0]),
            s2_resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", 0)),
            min_tiles=int(top.get("min_tiles") or 1),
            max_tiles=int(top.get("max_tiles") or 12),
            video_pool_sizes=video_pool_sizes_from_encoder(top.get("video_encoder")),
            num_video_frames=int(top.get("num_video_frames") or 8),
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            media_end_token_ids=tuple(media_end_token_ids),
        )
        stated = top.get("mm_hidden_size")
        if stated is not None and stated != cfg.mm_hidden_size:
            raise ValueError(f"config.json says mm_hidden_size {stated}, but a {vision.hidden_size}-wide tower "
                             f"{'with ' + str(len(cfg.s2_scales)) + ' S2 scales ' if dynamic_s2 else ''}gives "
                             f"{cfg.mm_hidden_size}")
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The media settings of the top-level NVILA `config.json` (sub-configs are written beside it)."""
        if self.video_pool_sizes:
            encoder = {"_target_": "llava.model.encoders.TSPVideoEncoder",
                       "pool_sizes": [list(p) for p in self.video_pool_sizes]}
        else:
            encoder = {"_target_": "llava.model.encoders.BasicVideoEncoder"}
        return {
            "hidden_size": self.llm.hidden_size,
            "mm_hidden_size": self.mm_hidden_size,
            "mm_projector_type": self.projector_type,
            "mm_vision_select_layer": self.select_layer,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": self.image_aspect_ratio,
            "dynamic_s2": self.dynamic_s2,
            "s2_scales": ",".join(str(s) for s in self.s2_scales),
            "s2_max_split_size": self.s2_max_split_size,
            "s2_resize_output_to_scale_idx": self.s2_resize_output_to_scale_idx,
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "num_video_frames": self.num_video_frames,
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
            "video_encoder": json.dumps(encoder),
        }


def video_pool_sizes_from_encoder(encoder: str | dict | None) -> tuple[tuple[int, int, int], ...]:
    """The TSP pool sizes named by an NVILA `video_encoder` setting (a JSON string or dict)."""
    if encoder is None:
        return ()
    if isinstance(encoder, str):
        encoder = json.loads(encoder)
    target = str(encoder.get("_target_", ""))
    if target.endswith("BasicVideoEncoder"):
        return ()
    if not target.endswith("TSPVideoEncoder"):
        raise ValueError(f"unsupported video encoder {target!r}")
    if encoder.get("start_tokens") or encoder.get("sep_tokens") or encoder.get("end_tokens", "\n") != "\n":
        raise ValueError("video encoders with start/separator tokens or a non-newline end token are not supported")
    return tuple(tuple(int(x) for x in p) for p in encoder.get("pool_sizes", ()))
