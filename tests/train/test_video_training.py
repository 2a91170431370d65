"""Video training: the embeddings the training forward hands the LLM for packed rows that mix videos
and images of several records equal, segment by segment, what inference builds (build_media_prompt,
then embed_prompt with video_block / image_blocks); the loss is functional.loss on those; a few steps
lower the loss in one compiled program.

A tiny random NVILA: 28 px tiles of 7 px patches (4x4 feature maps, 2x2 tokens after the projector),
4 frames per video pooled by two TSP pools — (2, 1, 1): 2 groups of 4 tokens, and (4, 2, 2): 1 group
of 1 token — each group followed by the "\\n" end embedding: Kv = 2·5 + 2 = 12 rows; an image is K = 5.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.data.demo_shapes import demo_tokenizer_files
from jvila.data.pipeline import DataConfig, build_train_iterator
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.nvila import (abstract_nvila, embed_prompt, image_blocks, image_token_count, nvila_from_params,
                                video_block, video_token_count)
from jvila.models.params import flat_params
from jvila.processing.image import SiglipPreprocessor
from jvila.processing.media_prompt import ImageMedia, MediaSettings, build_media_prompt
from jvila.processing.tokenizer import Tokenizer
from jvila.train import forward, optimizer as opt
from jvila.train.metrics import flop_model, step_flops
from jvila.train.step import init_train_state, make_train_step
from jvila.vision_config import NVILAConfig, SiglipConfig
from nvila_fixture import write_random_video

TILE, FRAMES, POOLS = 28, 4, ((2, 1, 1), (4, 2, 2))
QUESTION = "What is in the video?"
# Records (id, images, videos) in file order. First-fit into 2 rows of at most 3 videos: row 0 packs
# "mix" (an image and a video), "two" (two videos) and "photo" (an image); "last" (an image and a
# video) no longer fits row 0's videos and opens row 1.
RECORDS = [("mix", ["p0.png"], ["v0.mp4"]), ("two", [], ["v1.mp4", "v2.mp4"]), ("photo", ["p1.png"], []),
           ("last", ["p2.png"], ["v0.mp4"])]
LAYOUT = {0: ["mix", "two", "photo"], 1: ["last"]}


def _setup():
    tokenizer = Tokenizer.from_files(demo_tokenizer_files())
    llm = LLMConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=24, intermediate_size=40, num_layers=1,
                    num_heads=3, num_kv_heads=1, head_dim=8, family="qwen2", qkv_bias=True)
    vision = SiglipConfig(hidden_size=12, intermediate_size=20, num_layers=1, num_heads=2, image_size=TILE,
                          patch_size=7)
    cfg = NVILAConfig(llm=llm, vision=vision, image_aspect_ratio="resize", dynamic_s2=False, select_layer=-1,
                      video_pool_sizes=POOLS, num_video_frames=FRAMES,
                      image_token_id=tokenizer.token_to_id("<image>"),
                      video_token_id=tokenizer.token_to_id("<vila/video>"),
                      media_end_token_ids=tuple(tokenizer.encode("\n")))
    media = MediaSettings(SiglipPreprocessor(size=(TILE, TILE)), image_aspect_ratio="resize", num_video_frames=FRAMES)
    return tokenizer, media, cfg


def _model(cfg, seed):
    """Random weights drawn in NumPy (a jax.random init compiles once per shape: seconds here)."""
    rng = np.random.default_rng(seed)
    shapes = flat_params(abstract_nvila(cfg))
    return nvila_from_params(cfg, {k: (1.0 if k.endswith(".scale") else 0.0) + 0.1 * rng.normal(size=v.shape)
                                   for k, v in shapes.items()})


def _write(tmp_path, rng):
    for i, frames in enumerate((3, 7, 5)):  # 3 < 4 frames: sampling repeats frames, as at inference
        write_random_video(tmp_path / f"v{i}.mp4", frames, rng)
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    lines = [json.dumps({"id": rid, "image": images, "video": videos, "conversations": [
        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": f"{rid} ok"}]}) for rid, images, videos in RECORDS]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    return {rid: (images, videos) for rid, images, videos in RECORDS}


def _iterator(tmp_path, tokenizer, media, cfg, **kw):
    data = dict(paths=[str(tmp_path / "r.jsonl")], packing_length=160, max_images_per_row=3, max_videos_per_row=3,
                global_batch_size=2, shuffle=False, num_epochs=1) | kw
    return build_train_iterator(DataConfig(**data), tokenizer, media, cfg, process_index=0, process_count=1)


def test_training_embeddings_equal_inference_for_rows_mixing_videos_and_images(tmp_path, monkeypatch):
    tokenizer, media, cfg = _setup()
    sources = _write(tmp_path, np.random.default_rng())
    batch = next(_iterator(tmp_path, tokenizer, media, cfg))
    model = _model(cfg, 1)
    assert batch["videos"].shape == (2, 3, FRAMES, TILE, TILE, 3)

    want_rows, slots = [], {"images": [0, 0], "videos": [0, 0]}
    for row, names in LAYOUT.items():
        seg = batch["segment_ids"][row]
        assert seg.max() == len(names)
        embeds = []
        for s, rid in enumerate(names, 1):
            images, videos = sources[rid]
            prompt = build_media_prompt(tokenizer, media, [
                {"role": "user", "content": [{"type": "image", "image": str(tmp_path / p)} for p in images]
                 + [{"type": "video", "video": str(tmp_path / v)} for v in videos] + [QUESTION]},
                {"role": "assistant", "content": f"{rid} ok"}], add_generation_prompt=False)
            blocks = [image_blocks(model, m.tiles)[0] if isinstance(m, ImageMedia) else video_block(model, m.frames)
                      for m in prompt.media]
            assert {b.shape for b, m in zip(blocks, prompt.media) if not isinstance(m, ImageMedia)} <= \
                {(video_token_count(cfg, FRAMES), cfg.llm.hidden_size)} == {(12, 24)}
            ids, emb, _ = embed_prompt(model, prompt.token_ids, blocks)
            np.testing.assert_array_equal(batch["tokens"][row][seg == s], ids, err_msg=rid)
            for key, pixels in (("images", [m.tiles[0] for m in prompt.media if isinstance(m, ImageMedia)]),
                                ("videos", [m.frames for m in prompt.media if not isinstance(m, ImageMedia)])):
                start = slots[key][row]
                np.testing.assert_array_equal(batch[key][row, start:start + len(pixels)],
                                              np.array(pixels).reshape(-1, *batch[key].shape[2:]), err_msg=rid)
                slots[key][row] += len(pixels)
            embeds.append(np.asarray(emb))
        embeds.append(np.asarray(model.llm.embed_tokens(jnp.asarray(batch["tokens"][row][seg == 0]))))
        want_rows.append(np.concatenate(embeds))
    assert slots == {"images": [2, 1], "videos": [3, 1]}
    assert not batch["videos"][1, 1:].any() and not batch["images"][1, 1:].any()
    assert int((batch["tokens"] == cfg.video_token_id).sum()) == 4 * video_token_count(cfg, FRAMES)
    want = np.stack(want_rows)

    seen = {}
    real_loss = functional.loss

    def spy(*args, input_embeddings=None, **kw):
        seen["embeddings"] = np.asarray(input_embeddings)
        return real_loss(*args, input_embeddings=input_embeddings, **kw)

    monkeypatch.setattr(functional, "loss", spy)
    graphdef, params = nnx.split(model)
    got_loss, aux = forward.batch_loss(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()},
                                       attention=dense_attention)
    monkeypatch.undo()
    # float32, embeddings O(0.1-1): training runs all frames through the tower in one batch and pools
    # videos under vmap, inference one video at a time — the same math, rounding apart (seen ~2e-7).
    np.testing.assert_allclose(seen["embeddings"], want, rtol=0, atol=2e-5)
    # The video rows are not the text embedding of the video token: the splice happened.
    is_video = batch["tokens"] == cfg.video_token_id
    text = np.asarray(model.llm.embed_tokens(jnp.asarray(batch["tokens"])))
    assert np.abs(seen["embeddings"][is_video] - text[is_video]).max() > 0.1
    llm_graphdef, llm_params = nnx.split(model.llm)
    want_loss = real_loss(llm_graphdef, llm_params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["targets"]),
                          jnp.asarray(batch["weights"]), attention=dense_attention,
                          positions=jnp.asarray(batch["positions"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                          input_embeddings=jnp.asarray(want))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    assert float(aux["tokens"]) == batch["weights"].sum() > 0


def test_steps_on_video_rows_lower_the_loss_in_one_compile(tmp_path):
    tokenizer, media, cfg = _setup()
    _write(tmp_path, np.random.default_rng())
    batches = list(_iterator(tmp_path, tokenizer, media, cfg, num_epochs=2, shuffle=True, seed=1))
    assert len(batches) >= 2 and all(b["videos"].any() for b in batches)
    model = _model(cfg, 2)
    graphdef, params = nnx.split(model)
    mask = opt.trainable_mask(params, "sft")
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.0), params, mask, 10)
    step = make_train_step(graphdef, optimizer, attention=dense_attention)
    train_state = init_train_state(graphdef, jax.tree.map(jnp.copy, params), optimizer, mask)
    losses = []  # a step's loss is its batch's before the update: steps 0 and 6 both see batches[0]
    for i in range(7):
        train_state, metrics = step(train_state, batches[i % 2], jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and step.compilations() == 1
    assert losses[6] < losses[0] - 0.1, losses


def test_bad_video_batches_are_clear_errors():
    tokenizer, media, cfg = _setup()
    model = _model(cfg, 3)
    graphdef, params = nnx.split(model)
    tokens = np.zeros((2, 16), np.int32)
    batch = dict(tokens=tokens, targets=tokens, weights=np.ones((2, 16), np.float32), positions=tokens,
                 segment_ids=tokens + 1, images=np.zeros((2, 1, TILE, TILE, 3), np.float32))
    with pytest.raises(ValueError, match=r"videos must be \[B=2, V, T, H, W, 3\]"):
        forward.batch_loss(graphdef, params, batch | {"videos": np.zeros((2, FRAMES, TILE, TILE, 3), np.float32)},
                           attention=dense_attention)
    text_graphdef, text_params = nnx.split(model.llm)
    with pytest.raises(ValueError, match="no vision tower"):
        forward.batch_loss(text_graphdef, text_params, {k: batch[k] for k in forward.TEXT_KEYS}
                           | {"videos": np.zeros((2, 1, FRAMES, TILE, TILE, 3), np.float32)}, attention=dense_attention)
    with pytest.raises(ValueError, match="multiple of 2"):
        build_train_iterator(DataConfig(paths=["unused.jsonl"]), tokenizer,
                             MediaSettings(media.preprocessor, num_video_frames=5), cfg, process_index=0,
                             process_count=1)


def test_step_flops_count_every_frame_of_a_video():
    """A video costs T frames of the tower and the projector on each frame's 2x2 tokens (the pooling
    is a mean): T times an image's tower cost, read off a batch with one image."""
    _, _, cfg = _setup()
    shapes = {k: tuple(v.shape) for k, v in flat_params(abstract_nvila(cfg)).items()}
    model = flop_model(cfg, shapes, {n: True for n in shapes})
    k, kv = image_token_count(cfg), video_token_count(cfg, FRAMES)
    segments = np.ones((1, 40), np.int32)

    def flops(token_id, count):
        tokens = np.full((1, 40), 7)
        tokens[0, 2:2 + count] = token_id
        return step_flops(model, {"tokens": tokens, "segment_ids": segments})

    text = flops(7, 0)
    projector = 2.0 * sum(np.prod(v) for n, v in shapes.items() if n.startswith("projector.")) * 3  # trains: 6N
    tower = flops(cfg.image_token_id, k) - text - projector * k  # the image count puts K on the projector
    assert tower > 0
    assert flops(cfg.video_token_id, kv) - text == pytest.approx(FRAMES * (tower + projector * 4), rel=1e-12)


def test_videos_split_over_rows_only_on_a_mesh_with_sequence_shards():
    """The loop places `videos` [B, V, T, H, W, 3] by rows alone: V (here 3) need not divide over the
    sequence shards that split tokens [B, L]."""
    from jvila.train.loop import global_batch
    from sharding.mesh import MeshConfig, build_mesh

    mesh = build_mesh(MeshConfig(fsdp=2, sequence=2, sequence_a2a=2), jax.devices()[:8])
    rng = np.random.default_rng()
    local = {"tokens": rng.integers(0, 50, (4, 16)).astype(np.int32),
             "videos": rng.normal(size=(4, 3, FRAMES, 7, 7, 3)).astype(np.float32)}
    placed = global_batch(local, mesh)
    np.testing.assert_array_equal(np.asarray(placed["videos"]), local["videos"])
    assert placed["videos"].sharding.spec[1:] in ((), (None,) * 5)  # rows split, the rest whole
    assert placed["tokens"].sharding.spec[1] is not None  # tokens: split over the sequence shards
