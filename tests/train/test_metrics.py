"""Model FLOPs per step (the MFU numerator) against a count written out from the architecture, the
peak table lookup, and the log line."""

import numpy as np
import pytest

from jvila.config import LLMConfig
from jvila.train.metrics import flop_model, format_line, peak_tflops, segment_lengths, step_flops
from jvila.vision_config import NVILAConfig, SiglipConfig

CFG = LLMConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_layers=3, num_heads=3, num_kv_heads=1,
                head_dim=8)


def llm_shapes(cfg, prefix=""):
    e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    shapes = {f"{prefix}embed": (cfg.vocab_size, e), f"{prefix}final_norm.scale": (e,),
              f"{prefix}lm_head": (e, cfg.vocab_size)}
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}."
        shapes.update({p + "attn.q_proj": (e, h, d), p + "attn.k_proj": (e, kv, d), p + "attn.v_proj": (e, kv, d),
                       p + "attn.o_proj": (h, d, e), p + "mlp.gate_proj": (e, m), p + "mlp.up_proj": (e, m),
                       p + "mlp.down_proj": (m, e), p + "input_norm.scale": (e,),
                       p + "post_attention_norm.scale": (e,)})
    return shapes


def packed(lengths_per_row, width):
    seg = np.zeros((len(lengths_per_row), width), np.int32)
    for r, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths, 1):
            seg[r, start:start + n] = i
            start += n
    return seg


def test_llm_step_flops_match_the_formula():
    seg = packed([[5, 9, 3], [17], [2, 2]], width=19)  # padding at the row ends
    assert sorted(segment_lengths(seg)) == [2, 2, 3, 5, 9, 17]
    shapes = llm_shapes(CFG)
    model = flop_model(CFG, shapes, {n: True for n in shapes})
    e, h, kv, d, m, v = 24, 3, 1, 8, 40, 97
    per_layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * m + 2 * e
    n = 3 * per_layer + e + e * v  # the embedding table excluded, the head counted
    tokens = 5 + 9 + 3 + 17 + 2 + 2
    pairs = sum(s * (s + 1) // 2 for s in (5, 9, 3, 17, 2, 2))
    want = 6 * n * tokens + 3 * 4 * h * d * pairs * 3  # 6N per token; attention fwd 4·H·d per pair, x3
    assert step_flops(model, {"segment_ids": seg}) == pytest.approx(want, rel=1e-12)
    # Nothing but LoRA trains: the decoder's weights get no gradients (4N), activations still do.
    frozen = flop_model(CFG, shapes, {n: False for n in shapes}, lora=True)
    assert step_flops(frozen, {"segment_ids": seg}) == pytest.approx(4 * n * tokens + 3 * 4 * h * d * pairs * 3)


def test_nvila_counts_images_and_frozen_parts():
    vision = SiglipConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, image_size=28,
                          patch_size=7)
    cfg = NVILAConfig(llm=CFG, vision=vision, dynamic_s2=False, image_aspect_ratio="resize", image_token_id=96,
                      media_end_token_ids=(5,))
    shapes = llm_shapes(CFG, "llm.") | {"vision_tower.patch_embed": (7 * 7 * 3, 16),
                                        "vision_tower.position_embedding": (16, 16),
                                        "vision_tower.layers.0.fc1": (16, 24), "projector.fc": (64, 24)}
    train_projector = {n: n.startswith("projector.") for n in shapes}
    model = flop_model(cfg, shapes, train_projector)
    k = model.image_tokens
    assert k == 2 * 2 + 1  # a 4x4 map, 2x2 downsampling, one end token
    tokens = np.full((1, 20), 7)
    tokens[0, 3:3 + 2 * k] = 96  # two images
    batch = {"tokens": tokens, "segment_ids": np.ones((1, 20), np.int32)}
    text_only = {"tokens": np.full((1, 20), 7), "segment_ids": batch["segment_ids"]}
    n_vision = 7 * 7 * 3 * 16 + 16 * 24
    vision = 2 * (2 * n_vision * 16 + 4 * 16 * 16 ** 2 * 2)  # two images, forward only (frozen, nothing before it)
    projector = 2 * 2 * 64 * 24 * k * 3  # trains: 6 per weight per image token
    assert step_flops(model, batch) - step_flops(model, text_only) == pytest.approx(vision + projector)


def test_peak_table_and_line():
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5p") == 459.0
    assert peak_tflops("cpu") is None
    line = format_line(7, {"loss": 1.23456, "tokens_per_s": 1234.5, "step_time_s": 0.5, "mfu": 0.412}, 10)
    assert line == "step 7/10 loss 1.2346 tokens/s 1234 step 0.500s mfu 41.2%"
    assert format_line(1, {"loss": 2.0, "mfu": None}).endswith("mfu n/a")
