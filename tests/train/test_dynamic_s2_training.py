"""Dynamic-S2 training: records' tokens, tiles and spliced embeddings equal the inference path's, for
rows mixing images of different tile grids with single-tile images; the tables merge any grid mix in
one program; a few steps lower the loss; iterator state and bad records as for resized images.

A tiny random NVILA with Dynamic-S2 features: 28 px tiles of 7 px patches (4 x 4 feature maps), S2
scales 28/56/84 (VILA's 1:2:3), the last scale's grid 9-12 tiles; images of aspect 3:1, 2:5 and 1:1
pick grids (2, 6), (5, 2) and (3, 3) — 17, 15 and 14 tiles.
"""

import json
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.data.demo_shapes import demo_tokenizer_files
from jvila.data.pipeline import DataConfig, PrepareExample, SkippedRecordWarning, _Media, build_train_iterator
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.nvila import abstract_nvila, embed_prompt, image_blocks, image_token_count, nvila_from_params
from jvila.models.params import flat_params
from jvila.processing.image import SiglipPreprocessor
from jvila.processing.media_prompt import MediaSettings, build_media_prompt
from jvila.processing.tokenizer import Tokenizer
from jvila.train import forward, optimizer as opt
from jvila.train.dynamic_s2 import S2Layout, image_embeddings
from jvila.train.step import init_train_state, make_train_step
from jvila.vision_config import NVILAConfig, SiglipConfig

TILE, SCALES = 28, (28, 56, 84)
QUESTION = "How many shapes are there?"
# name -> (width, height): the last scale's grid follows the aspect ratio.
PICTURES = {"wide": (90, 30), "tall": (30, 75), "square": (40, 40), "a": (33, 20), "b": (20, 41)}
GRIDS = {"wide": (2, 6), "tall": (5, 2), "square": (3, 3)}


def _tokenizer():
    return Tokenizer.from_files(demo_tokenizer_files())


def _config(tokenizer, *, resize_index=-1, projector="mlp_downsample_2x2_fix"):
    llm = LLMConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=24, intermediate_size=40, num_layers=1,
                    num_heads=3, num_kv_heads=1, head_dim=8, family="qwen2", qkv_bias=True)
    vision = SiglipConfig(hidden_size=12, intermediate_size=20, num_layers=1, num_heads=2, image_size=TILE,
                          patch_size=7)
    return NVILAConfig(llm=llm, vision=vision, projector_type=projector, image_aspect_ratio="dynamic_s2",
                       dynamic_s2=True, s2_scales=SCALES, s2_resize_output_to_scale_idx=resize_index,
                       select_layer=-1, image_token_id=tokenizer.token_to_id("<image>"),
                       video_token_id=tokenizer.token_to_id("<vila/video>"),
                       media_end_token_ids=tuple(tokenizer.encode("\n")))


def _settings():
    return MediaSettings(SiglipPreprocessor(size=(TILE, TILE)), image_aspect_ratio="dynamic_s2", s2_scales=SCALES,
                         max_tiles=12)


def _model(cfg, seed):
    """Random weights drawn in NumPy (a jax.random init compiles once per shape: seconds here)."""
    rng = np.random.default_rng(seed)
    shapes = flat_params(abstract_nvila(cfg))
    return nvila_from_params(cfg, {k: (1.0 if k.endswith(".scale") else 0.0) + 0.1 * rng.normal(size=v.shape)
                                   for k, v in shapes.items()})


def _records(tmp_path, rng, extra=()):
    """wide (S2), a + b (one record, single tiles), tall (S2), square (S2), in this order."""
    for name, size in PICTURES.items():
        PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    records = [("wide", ["wide.png"]), ("two", ["a.png", "b.png"]), ("tall", ["tall.png"]),
               ("square", ["square.png"]), *extra]
    lines = [json.dumps({"id": rid, "image": images, "conversations": [
        {"from": "human", "value": "<image>\n" * len(images) + QUESTION}, {"from": "gpt", "value": f"{rid} ok"}]})
        for rid, images in records]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    return {rid: images for rid, images in records}


def _iterator(tmp_path, tokenizer, cfg, **kw):
    # No video slots: every slot would run its frames through the tower in each step.
    data = dict(paths=[str(tmp_path / "r.jsonl")], packing_length=400, max_tiles_per_row=34, global_batch_size=2,
                num_epochs=1, shuffle=False, max_videos_per_row=0) | kw
    return build_train_iterator(DataConfig(**data), tokenizer, _settings(), cfg, process_index=0, process_count=1)


def _inference_prompt(tokenizer, tmp_path, images, answer):
    return build_media_prompt(tokenizer, _settings(), [
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / i)} for i in images]
         + [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": answer}], add_generation_prompt=False)


def test_training_tokens_tiles_and_embeddings_equal_inference(tmp_path, monkeypatch):
    """Row 0 packs wide (2x6 grid), a two-image record (single tiles) and tall (5x2): 34 tiles, the whole
    budget; row 1 holds square (3x3). Every segment's tokens and tiles are build_media_prompt's, and the
    embeddings batch_loss hands the LLM are embed_prompt's with image_blocks(tiles, grid)."""
    tokenizer = _tokenizer()
    cfg = _config(tokenizer)
    records = _records(tmp_path, np.random.default_rng())
    batch = next(_iterator(tmp_path, tokenizer, cfg))
    model = _model(cfg, 0)

    want_rows, image_slot = [], [0, 0]
    layout = {0: ["wide", "two", "tall"], 1: ["square"]}
    for row, names in layout.items():
        seg = batch["segment_ids"][row]
        assert seg.max() == len(names)
        embeds = []
        for s, rid in enumerate(names, 1):
            prompt = _inference_prompt(tokenizer, tmp_path, records[rid], f"{rid} ok")
            assert [m.grid for m in prompt.media] == ([GRIDS[rid]] if rid in GRIDS else [None, None])
            ids, emb, _ = embed_prompt(model, prompt.token_ids,
                                       [b for m in prompt.media for b in image_blocks(model, m.tiles, m.grid)])
            np.testing.assert_array_equal(batch["tokens"][row][seg == s], ids)
            assert (ids == cfg.image_token_id).sum() == sum(image_token_count(cfg, m.grid) for m in prompt.media)
            tiles = np.concatenate([m.tiles for m in prompt.media])
            np.testing.assert_array_equal(batch["images"][row, image_slot[row]:image_slot[row] + len(tiles)], tiles)
            image_slot[row] += len(tiles)
            embeds.append(np.asarray(emb))
        pad = int((seg == 0).sum())
        embeds.append(np.asarray(model.llm.embed_tokens(jnp.asarray(batch["tokens"][row][seg == 0]))))
        want_rows.append(np.concatenate(embeds))
        assert len(embeds[-1]) == pad
    assert image_slot == [34, 14] and not batch["images"][1, 14:].any()
    want = np.stack(want_rows)

    # The embeddings batch_loss hands the functional core, caught on their way in (same trace, so
    # the jitted function can return them).
    seen = {}
    real_loss = functional.loss

    def spy(*args, input_embeddings=None, **kw):
        seen["embeddings"] = input_embeddings
        return real_loss(*args, input_embeddings=input_embeddings, **kw)

    monkeypatch.setattr(functional, "loss", spy)
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_and_embeddings(p, b):
        loss, aux = forward.batch_loss(graphdef, p, b, attention=dense_attention)
        return loss, aux, seen["embeddings"]

    got_loss, aux, got_embeddings = loss_and_embeddings(params, batch)
    monkeypatch.undo()
    # float32: the gather-sum adds the area windows' terms with product weights where inference
    # averages one axis then the other (rounding only); the tower and projector run batched.
    # Embeddings are O(0.1-1).
    np.testing.assert_allclose(np.asarray(got_embeddings), want, rtol=0, atol=2e-5)
    llm_graphdef, llm_params = nnx.split(model.llm)
    want_loss = jax.jit(real_loss, static_argnames=("graphdef", "attention"))(llm_graphdef, llm_params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["targets"]),
                          jnp.asarray(batch["weights"]), attention=dense_attention,
                          positions=jnp.asarray(batch["positions"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                          input_embeddings=jnp.asarray(want))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    assert float(aux["tokens"]) == batch["weights"].sum() > 0


def test_tables_merge_any_grid_like_inference():
    """Another output scale (the first: every scale area-downsized, windows of 2-12 inputs per axis)
    and a projector whose 3x3 step pads the 4x4 maps; grids at the tiling's extremes (1x9, 12x1) and
    between, with single tiles among them; a second row holding one image alone."""
    tokenizer = _tokenizer()
    cfg = _config(tokenizer, resize_index=0, projector="mlp_downsample_3x3_fix")
    model = _model(cfg, 1)
    grids = [(1, 9), None, (4, 3), (2, 5), None, (12, 1)]
    layout = S2Layout.create(cfg, max_tiles_per_row=80, max_image_tiles=12)
    assert sum(layout.image_tiles(g) for g in grids) <= 80
    rng = np.random.default_rng()
    tiles = [rng.normal(size=(layout.image_tiles(g), TILE, TILE, 3)).astype(np.float32) for g in grids]
    images = np.zeros((2, 80, TILE, TILE, 3), np.float32)
    images[0, :sum(map(len, tiles))] = np.concatenate(tiles)
    images[1, :len(tiles[2])] = tiles[2]
    tables = layout.batch_tables([grids, [grids[2]]])
    graphdef, params = nnx.split(model)
    got = jax.jit(lambda p, b: image_embeddings(nnx.merge(graphdef, p), b))(params, dict(images=images, **tables))
    want = np.concatenate([np.asarray(image_blocks(model, t, g)[0]) for t, g in zip(tiles, grids)])
    assert want.shape[0] == sum(layout.image_rows(g) for g in grids) <= layout.token_rows
    np.testing.assert_allclose(np.asarray(got[0, :len(want)]), want, rtol=0, atol=2e-5)  # as above
    np.testing.assert_allclose(np.asarray(got[1, :layout.image_rows(grids[2])]),
                               np.asarray(image_blocks(model, tiles[2], grids[2])[0]), rtol=0, atol=2e-5)


def test_steps_lower_the_loss_in_one_compile_and_state_round_trips(tmp_path):
    """Shuffled epochs pack different grid mixes; the step compiles once and the loss on the first batch
    falls. A resumed iterator yields the same batches, tables included; a missing image and a record over
    the tile budget are counted and skipped; the prepare step survives pickling (Grain's workers)."""
    tokenizer = _tokenizer()
    cfg = _config(tokenizer)
    rng = np.random.default_rng()
    _records(tmp_path, rng, extra=[("missing", ["nowhere.png"])])
    kw = dict(num_epochs=None, shuffle=True, seed=3)
    it = _iterator(tmp_path, tokenizer, cfg, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(it) for _ in range(3)]
        state = it.get_state()
        later = [next(it) for _ in range(2)]
    assert it.skipped.get("bad_media", 0) >= 1
    assert any(issubclass(w.category, SkippedRecordWarning) and "missing" in str(w.message) for w in caught)
    resumed = _iterator(tmp_path, tokenizer, cfg, **kw)
    resumed.set_state(json.loads(json.dumps(state)))
    for a, b in zip(later, [next(resumed) for _ in range(2)]):
        assert a.keys() == b.keys() >= {"s2_index", "s2_weight", "s2_rows", "images"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Different grid mixes (so different tables) reach the same program below.
    assert len({b["s2_index"].tobytes() for b in batches + later}) > 1

    model = _model(cfg, 2)
    graphdef, params = nnx.split(model)
    # Projector + LLM (NVILA's stage 2): training the tower as well doubles the step's compile here
    # and adds only autodiff through the same gathers.
    mask = opt.trainable_mask(params, "llm_pretrain")
    optimizer = opt.build_optimizer(opt.OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.0), params, mask, 10)
    step = make_train_step(graphdef, optimizer, attention=dense_attention)
    train_state = init_train_state(graphdef, jax.tree.map(jnp.copy, params), optimizer, mask)
    losses = []
    # The first batch again at the end: the step's loss is taken before its update, so the two
    # losses on it are before and after training.
    for i, batch in enumerate(batches + later + batches[:1]):
        train_state, metrics = step(train_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert step.compilations() == 1
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses

    # Over the tile budget: wide has 17 tiles.
    small = _iterator(tmp_path, tokenizer, cfg, max_tiles_per_row=16)
    with pytest.warns(SkippedRecordWarning, match="17 image tiles exceed max_tiles_per_row 16"):
        while True:
            try:
                next(small)
            except StopIteration:
                break
    assert small.skipped["too_many_images"] == 1

    # Grain's worker processes get the prepare step pickled: the copy makes the same example.
    layout = S2Layout.create(cfg, 34, 12)
    prepare = PrepareExample(tokenizer, _Media(_settings(), cfg.image_token_id, image_token_count(cfg), layout),
                             [str(tmp_path)])
    line = (tmp_path / "r.jsonl").read_text().splitlines()[0]
    a, b = prepare((line, 0, 0)), pickle.loads(pickle.dumps(prepare))((line, 0, 0))
    assert a.image_grids == b.image_grids == (GRIDS["wide"],)
    for x, y in ((a.tokens, b.tokens), (a.loss_mask, b.loss_mask), (a.images, b.images)):
        np.testing.assert_array_equal(x, y)


def test_configuration_errors(tmp_path):
    tokenizer = _tokenizer()
    cfg = _config(tokenizer)
    _records(tmp_path, np.random.default_rng(0))
    plain = NVILAConfig(**{**cfg.__dict__, "dynamic_s2": False, "image_aspect_ratio": "resize"})
    with pytest.raises(ValueError, match="no dynamic_s2 features"):
        _iterator(tmp_path, tokenizer, plain)
    with pytest.raises(ValueError, match="below the 14 tiles of the smallest"):
        _iterator(tmp_path, tokenizer, cfg, max_tiles_per_row=13)
    with pytest.raises(ValueError, match="max_tiles_per_row must be at least 1"):
        DataConfig(paths=["x.jsonl"], max_tiles_per_row=0)
    # The default budget: max_images_per_row - 1 single tiles plus the largest image (1 + 4 + 12 tiles).
    it = _iterator(tmp_path, tokenizer, cfg, max_tiles_per_row=None, max_images_per_row=3)
    batch = next(it)
    assert batch["images"].shape[1] == 2 + 17
    # Tables that do not fit the images, or a model without Dynamic-S2 features: named before any compute.
    model = _model(cfg, 0)
    with pytest.raises(ValueError, match="missing \\['s2_weight'\\]"):
        image_embeddings(model, {k: v for k, v in batch.items() if k != "s2_weight"})
    with pytest.raises(ValueError, match="must both be"):
        image_embeddings(model, batch | {"s2_index": batch["s2_index"][:, :2]})
    with pytest.raises(ValueError, match="s2_rows must be"):
        image_embeddings(model, batch | {"s2_rows": batch["s2_rows"][0]})
    with pytest.raises(ValueError, match="no dynamic_s2 features"):
        image_embeddings(_model(plain, 0), batch)
