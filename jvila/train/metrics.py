"""What a training run reports: tokens/s, step time, model FLOPs utilisation, and TensorBoard events.

Model FLOPs of one step (the MFU numerator; PaLM's convention of counting only the model's own
math, never recomputation):

- matmuls: 2·N FLOPs per token forward for the N weights a token meets, 2·N backward for the
  activation gradients wherever gradients still have to flow, 2·N for the weight gradients of
  the parts that train. A fully trained decoder is the familiar 6·N per token. N excludes the
  embedding table (a gather, no math) but counts the output head, which is a [hidden, vocab]
  matmul even when it shares the embedding's weights.
- causal attention: per layer, QKᵀ and PV each cost 2·heads·head_dim FLOPs for every visible
  (query, key) pair — s(s+1)/2 pairs in a packed segment of s tokens — so 4·H·d·s(s+1)/2 forward
  and twice that backward (both operands of each product need gradients) whenever gradients flow
  through it; counted per packed segment, since segments do not attend to each other.
- NVILA: the SigLIP tower on every image present (its patches, bidirectional attention over them),
  the projector on every image token, with the same forward/backward rule per part (a frozen tower
  behind nothing trainable costs its forward only). A video present counts its T frames the same
  way, the projector on each frame's tokens (the TSP pooling after it is a mean: no matmul).

MFU = model FLOPs per second / (devices · the device's bf16 dense peak). The peak comes from the
recipe (`train.peak_tflops`) or the table below by device kind; a CPU has none, and MFU is shown
as n/a.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from jvila.config import LLMConfig

# bf16 dense tensor peak per device, TFLOP/s (vendor data sheets), matched against device_kind.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
    "A10G": 125.0, "L4": 121.0, "L40S": 362.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The bf16 dense peak of a device kind ("NVIDIA H200", "TPU v5 lite"), None when unknown (CPU)."""
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """What a step's model FLOPs depend on, fixed for a run (see the module docstring)."""

    llm: LLMConfig
    llm_matmul_params: int  # decoder weights a token meets, embedding table excluded, head included
    llm_trains: bool
    grads_reach_llm: bool  # something before or inside the decoder trains
    # NVILA only:
    image_token_id: int | None = None
    image_tokens: int = 0  # K: token positions per image
    vision_matmul_params: int = 0  # tower weights applied per patch (position table excluded)
    vision_heads_dim: int = 0  # heads x head_dim of the tower
    vision_layers: int = 0
    patches: int = 0  # per image tile
    projector_params: int = 0
    vision_trains: bool = False
    projector_trains: bool = False
    video_token_id: int | None = None
    video_tokens: int = 0  # Kv: token positions per video
    video_frames: int = 0  # T
    frame_tokens: int = 0  # projected tokens per frame


def flop_model(cfg, flat_shapes: dict[str, tuple[int, ...]], trainable: dict[str, bool], *,
               lora: bool = False) -> FlopModel:
    """From the model config (LLMConfig or NVILAConfig), the flat param shapes and which params train.

    `lora`: an adapter on the decoder trains (its own FLOPs are negligible at small ranks; gradients
    flow through the whole decoder, its frozen weights get none)."""
    from jvila.vision_config import NVILAConfig

    def size(names):
        return sum(math.prod(flat_shapes[n]) for n in names)

    def trains(prefix):
        return any(v for n, v in trainable.items() if n.startswith(prefix))

    nvila = isinstance(cfg, NVILAConfig)
    prefix = "llm." if nvila else ""
    llm_cfg = cfg.llm if nvila else cfg
    llm_names = [n for n in flat_shapes if n.startswith(prefix)]
    matmul = size(n for n in llm_names if n != prefix + "embed")
    if llm_cfg.tie_embeddings:  # the head reuses the table, but its matmul still runs
        matmul += llm_cfg.vocab_size * llm_cfg.hidden_size
    llm_trains = trains(prefix) if nvila else any(trainable.values())
    if not nvila:
        return FlopModel(llm=llm_cfg, llm_matmul_params=matmul, llm_trains=llm_trains,
                         grads_reach_llm=llm_trains or lora)
    from jvila.models.nvila import image_token_count, video_token_count
    from jvila.models.projector import tokens_per_map

    try:
        video_tokens = video_token_count(cfg, cfg.num_video_frames)
    except ValueError:  # frames the pools do not divide: such a model trains no video
        video_tokens = 0
    g = cfg.vision.grid_size
    vision_names = [n for n in flat_shapes if n.startswith("vision_tower.")]
    vision_matmul = size(n for n in vision_names if "position" not in n)
    vision_trains, projector_trains = trains("vision_tower."), trains("projector.")
    return FlopModel(
        llm=llm_cfg, llm_matmul_params=matmul, llm_trains=llm_trains,
        grads_reach_llm=llm_trains or vision_trains or projector_trains or lora,
        image_token_id=cfg.image_token_id, image_tokens=image_token_count(cfg),
        vision_matmul_params=vision_matmul, vision_heads_dim=cfg.vision.hidden_size,
        vision_layers=cfg.vision.num_layers, patches=cfg.vision.grid_size ** 2,
        projector_params=size(n for n in flat_shapes if n.startswith("projector.")),
        vision_trains=vision_trains, projector_trains=projector_trains,
        # 0 is NVILAConfig's unset id (a real <vila/video> is an added special token, never id 0).
        video_token_id=cfg.video_token_id or None, video_tokens=video_tokens, video_frames=cfg.num_video_frames,
        frame_tokens=tokens_per_map(cfg.projector_type, g, g))


def _passes(grads_flow: bool, weights_train: bool) -> int:
    """Multiples of the forward cost: 1 forward, +1 activation gradients, +1 weight gradients."""
    return 1 + int(grads_flow) + int(weights_train)


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Lengths of every packed segment in a [rows, L] segment-id array (0 = padding, not counted)."""
    segment_ids = np.asarray(segment_ids)
    top = int(segment_ids.max(initial=0))
    counts = np.stack([np.bincount(row, minlength=top + 1)[1:] for row in segment_ids]) if top else np.zeros((1, 0))
    return counts[counts > 0]


def step_flops(model: FlopModel, batch: dict) -> float:
    """Model FLOPs of one training step on `batch` (global or this process's rows: the caller scales)."""
    seg = segment_lengths(batch["segment_ids"]).astype(np.float64)
    tokens = float(seg.sum())
    llm = model.llm
    llm_mult = _passes(model.grads_reach_llm, model.llm_trains)
    flops = 2.0 * model.llm_matmul_params * tokens * llm_mult
    # Attention's two matmuls multiply activations by activations: when gradients flow, both operands of
    # each need one (four matmuls), so the backward costs twice the forward whatever is frozen.
    attn_mult = 3 if model.grads_reach_llm else 1
    pairs = float(np.sum(seg * (seg + 1) / 2))
    flops += 4.0 * llm.num_heads * llm.head_dim * pairs * llm.num_layers * attn_mult
    if model.image_token_id is not None and model.image_tokens:
        images = float(np.sum(np.asarray(batch["tokens"]) == model.image_token_id)) / model.image_tokens
        vision_mult = _passes(model.vision_trains, model.vision_trains)
        per_image = 2.0 * model.vision_matmul_params * model.patches * vision_mult
        per_image += 4.0 * model.vision_heads_dim * model.patches ** 2 * model.vision_layers * \
            (3 if model.vision_trains else 1)
        flops += images * per_image
        projector_mult = _passes(model.vision_trains or model.projector_trains, model.projector_trains)
        flops += images * 2.0 * model.projector_params * model.image_tokens * projector_mult
        if model.video_token_id is not None and model.video_tokens:
            videos = float(np.sum(np.asarray(batch["tokens"]) == model.video_token_id)) / model.video_tokens
            frames = videos * model.video_frames
            flops += frames * (per_image + 2.0 * model.projector_params * model.frame_tokens * projector_mult)
    return flops


def batch_tokens(batch: dict) -> int:
    """Non-padding token positions of a batch."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))


class MetricsWriter:
    """Scalars to TensorBoard event files (process 0 only) and one line per log step to stderr."""

    def __init__(self, logdir, *, enabled: bool = True, stream=sys.stderr):
        self.enabled = enabled
        self.stream = stream
        self._writer = None
        if enabled:
            self._writer = _summary_writer_class()(logdir=str(logdir))

    def write(self, step: int, scalars: dict[str, float], *, total_steps: int | None = None) -> str:
        line = format_line(step, scalars, total_steps)
        if self.enabled:
            for name, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.flush()
        return line

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX only probes for torch (to accept
    its tensors), and importing it costs seconds in every training process. Scalars never need it."""
    probe_blocked = "torch" not in sys.modules
    if probe_blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if probe_blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def format_line(step: int, scalars: dict[str, float], total_steps: int | None = None) -> str:
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    formats = {"loss": "loss {:.4f}", "learning_rate": "lr {:.3g}", "grad_norm": "grad_norm {:.3g}",
               "tokens_per_s": "tokens/s {:.0f}", "step_time_s": "step {:.3f}s"}
    for name, fmt in formats.items():
        if scalars.get(name) is not None:
            parts.append(fmt.format(scalars[name]))
    mfu = scalars.get("mfu")
    parts.append("mfu n/a" if mfu is None else f"mfu {100 * mfu:.1f}%")
    return " ".join(parts)
