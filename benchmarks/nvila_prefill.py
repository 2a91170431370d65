"""NVILA prefill: media tokens and time to the first logits, with and without token compression.

One model, random weights: the SigLIP tower and the LLM are shared by every row; spatial
compression is the projector (`mlp_downsample_2x2_fix`, 2x2 spatial-to-channel, against
`mlp2x_gelu`, VILA-1.5's uncompressed projector of the same width), temporal compression is TSP
pooling of 8 frames (on or off). A Dynamic-S2 image and a video go through tower → projector →
splice → one jitted LLM prefill. Prints a table of medians; ratios are against the uncompressed
row of the same media.

    python benchmarks/nvila_prefill.py                            # CPU: tiny model; GPU: nvila-2b-random
    python benchmarks/nvila_prefill.py --config nvila-2b-random   # So400m/448 tower, Qwen2.5-1.5B-shaped LLM (GPU)
    python benchmarks/nvila_prefill.py --dry-run                  # CPU, smallest shapes, one sample each
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from device_guard import require_backend  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median_ms  # noqa: E402

from jvila.config import LLMConfig, RopeConfig  # noqa: E402
from jvila.models import functional, nvila  # noqa: E402
from jvila.models.kernel_attention import default_attention  # noqa: E402
from jvila.models.kv_cache import contiguous_cache  # noqa: E402
from jvila.models.projector import Projector, tokens_per_map  # noqa: E402
from jvila.vision_config import NVILAConfig, SiglipConfig  # noqa: E402

SPATIAL, PLAIN = "mlp_downsample_2x2_fix", "mlp2x_gelu"
IMAGE_ID, VIDEO_ID, NEWLINE_ID = 3, 4, 5
TEXT_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Setup:
    vision: SiglipConfig
    llm: LLMConfig
    dtype: str
    grid: tuple[int, int]  # last-scale Dynamic-S2 grid of the image
    frames: int
    budget_s: float  # per timed call
    samples: int  # at least this many timed samples; 1 = one untimed-warm-up-free call (dry run)


def _scales(vision):
    return tuple(vision.image_size * k for k in (1, 2, 3))


SETUPS = {
    "dry-run": Setup(SiglipConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, image_size=32,
                                  patch_size=4),
                     LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, family="qwen2"),
                     "float32", (3, 3), 8, 0.0, 1),
    "tiny": Setup(SiglipConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, image_size=64,
                               patch_size=4),
                  LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, family="qwen2"),
                  "float32", (3, 4), 16, 1.0, 3),
    # NVILA-2B's shapes: SigLIP So400m/14 at 448 and a Qwen2.5-1.5B-shaped LLM, bfloat16.
    "nvila-2b-random": Setup(SiglipConfig(),
                             LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                       num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
                                       rope=RopeConfig(theta=1e6), qkv_bias=True, tie_embeddings=True,
                                       max_position_embeddings=131072, family="qwen2"),
                             "bfloat16", (3, 4), 64, 2.0, 3),
}


def base_config(setup: Setup, projector_type: str, pool: bool) -> NVILAConfig:
    return NVILAConfig(llm=setup.llm, vision=setup.vision, projector_type=projector_type,
                       s2_scales=_scales(setup.vision), s2_max_split_size=setup.vision.image_size,
                       video_pool_sizes=((8, 1, 1),) if pool else (), num_video_frames=setup.frames,
                       image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, media_end_token_ids=(NEWLINE_ID,))


def sharing(base: nvila.NVILA, cfg: NVILAConfig, projector: Projector) -> nvila.NVILA:
    """A model with `cfg` that shares `base`'s tower and LLM (so every row runs the same weights)."""
    model = nvila.abstract_nvila(cfg)
    model.llm, model.vision_tower, model.projector = base.llm, base.vision_tower, projector
    return model


def build_models(setup: Setup):
    dtype = getattr(jnp, setup.dtype)
    base = nvila.NVILA(base_config(setup, SPATIAL, True), rngs=nnx.Rngs(0), param_dtype=dtype, compute_dtype=dtype)
    plain = Projector(PLAIN, base.config.mm_hidden_size, setup.llm.hidden_size, rngs=nnx.Rngs(1), param_dtype=dtype,
                      compute_dtype=dtype)
    models = {}
    for spatial in (True, False):
        for pool in (True, False):
            cfg = base_config(setup, SPATIAL if spatial else PLAIN, pool)
            models[spatial, pool] = sharing(base, cfg, base.projector if spatial else plain)
    return models


def expected_tokens(setup: Setup, media: str, spatial: bool, pool: bool) -> int:
    g = setup.vision.grid_size
    per_tile = tokens_per_map(SPATIAL if spatial else PLAIN, g, g)
    if media == "image":
        return setup.grid[0] * setup.grid[1] * per_tile + 1
    groups = setup.frames // 8 if pool else setup.frames
    return groups * (per_tile + 1)


def encode(model, media: str, pixels, grid):
    if media == "image":
        return nvila.image_blocks(model, pixels, grid)
    return [nvila.video_block(model, pixels)]


def prompt_ids(setup: Setup, media: str) -> np.ndarray:
    ids = np.random.default_rng(0).integers(NEWLINE_ID + 1, setup.llm.vocab_size, TEXT_TOKENS)
    ids[TEXT_TOKENS // 4] = IMAGE_ID if media == "image" else VIDEO_ID
    return ids


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"), donate_argnames=("cache",))
def llm_prefill(graphdef, state, tokens, lengths, cache, embeddings, *, attention):
    return functional.extend(graphdef, state, tokens, lengths, cache, attention=attention,
                             input_embeddings=embeddings)


def prefill(model, graphdef, state, ids, blocks, attention, dtype):
    """Splice, pad to a power-of-two bucket (few compilations) and run the jitted prefill: last-token logits."""
    expanded, embeds, _ = nvila.embed_prompt(model, ids, blocks)
    length = len(expanded)
    width = 1 << (length - 1).bit_length()
    tokens = jnp.zeros((1, width), jnp.int32).at[0, :length].set(jnp.asarray(expanded))
    padded = jnp.zeros((1, width, embeds.shape[-1]), embeds.dtype).at[0, :length].set(embeds)
    cache = contiguous_cache(model.config.llm, 1, width, dtype=dtype)
    logits, _ = llm_prefill(graphdef, state, tokens, jnp.asarray([length], jnp.int32), cache, padded,
                            attention=attention)
    return logits


def run(setup: Setup, name: str):
    dtype = getattr(jnp, setup.dtype)
    models = build_models(setup)
    graphdef, state = nnx.split(models[True, True].llm)
    attention = default_attention()
    rng = np.random.default_rng(1)
    size = setup.vision.image_size
    inputs = {
        "image": jnp.asarray(rng.normal(size=(5 + setup.grid[0] * setup.grid[1], size, size, 3)), dtype),
        "video": jnp.asarray(rng.normal(size=(setup.frames, size, size, 3)), dtype),
    }
    sync = jax.block_until_ready

    def measure(call):
        if setup.samples == 1:  # dry run: exercise the code once; the time includes compilation
            start = time.perf_counter()
            sync(call())
            return (time.perf_counter() - start) * 1e3
        return median_ms(call, sync, setup.budget_s, min_samples=setup.samples, max_samples=max(setup.samples, 10))

    rows, failures = [], 0
    cases = [("image", True, False), ("image", False, False)] + [
        ("video", spatial, pool) for spatial in (True, False) for pool in (True, False)]
    for media, spatial, pool in cases:
        model = models[spatial, pool]
        grid = setup.grid if media == "image" else None
        ids = prompt_ids(setup, media)
        blocks = encode(model, media, inputs[media], grid)
        tokens = sum(b.shape[0] for b in blocks)
        want = expected_tokens(setup, media, spatial, pool)
        ok = tokens == want
        failures += not ok
        print(f"[check] {media} spatial={spatial} temporal={pool}: {tokens} media tokens (expected {want}) "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
        vision_ms = measure(lambda: encode(model, media, inputs[media], grid))
        llm_ms = measure(lambda: prefill(model, graphdef, state, ids, blocks, attention, dtype))
        total_ms = measure(
            lambda: prefill(model, graphdef, state, ids, encode(model, media, inputs[media], grid), attention, dtype))
        rows.append((media, spatial, pool, tokens, tokens + TEXT_TOKENS - 1, vision_ms, llm_ms, total_ms))

    print(f"\nNVILA prefill ({name}, {setup.dtype}, {jax.default_backend()} {jax.devices()[0].device_kind}): "
          f"image = Dynamic-S2 {setup.grid[0]}x{setup.grid[1]} grid ({5 + setup.grid[0] * setup.grid[1]} tiles of "
          f"{size}px), video = {setup.frames} frames; {TEXT_TOKENS - 1} text tokens; "
          f"{'one call each, compilation included' if setup.samples == 1 else 'medians'}")
    print(f"{'media':<7}{'spatial':>9}{'temporal':>10}{'media tok':>11}{'prompt tok':>12}{'vision ms':>11}"
          f"{'LLM ms':>10}{'total ms':>10}{'tokens':>9}{'speed-up':>10}")
    for media, spatial, pool, tokens, prompt, vision_ms, llm_ms, total_ms in rows:
        base = next(r for r in rows if r[0] == media and not r[1] and not r[2])
        print(f"{media:<7}{'2x2' if spatial else 'none':>9}{'8 frames' if pool else 'none':>10}{tokens:>11}"
              f"{prompt:>12}{vision_ms:>11.1f}{llm_ms:>10.1f}{total_ms:>10.1f}{base[3] / tokens:>8.1f}x"
              f"{base[7] / total_ms:>9.2f}x")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SETUPS),
                        help="default: nvila-2b-random on a GPU (as the GPU suite runs it), tiny elsewhere")
    parser.add_argument("--dry-run", action="store_true", help="smallest shapes on CPU, one sample per timing")
    parser.add_argument("--frames", type=int, help="video frames (a multiple of 8)")
    args = parser.parse_args()
    name = "dry-run" if args.dry_run else args.config or (
        "nvila-2b-random" if jax.default_backend() == "gpu" else "tiny")
    require_backend("gpu", dry_run=name != "nvila-2b-random")
    setup = SETUPS[name]
    if args.frames:
        if args.frames % 8:
            parser.error("--frames must be a multiple of 8 (the temporal pool)")
        setup = dataclasses.replace(setup, frames=args.frames)
    sys.exit(1 if run(setup, name) else 0)


if __name__ == "__main__":
    main()
