"""NVILA end to end against PyTorch: a synthetic checkpoint in VILA's layout, loaded with `jvila.load`,
gives the logits and greedy tokens of a reference assembled from the transformers/torch parts.

Also: media enter generation as input embeddings, and spliced prompts decode as a cache-free
reference does.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jvila
import nvila_fixture as fx
from jvila import generate as gen
from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.llm import LLM
from jvila.processing.media_prompt import ImageMedia, build_media_prompt

# float32 on both sides; what remains is summation order (XLA vs torch) through ~10 layers, and the
# area resize computed as sums over windows: 1e-4 of the logit scale leaves ample room above that
# (observed ~1e-6) while any wrong layout, order or missing term shows up at 1e-2 or more.
LOGIT_RTOL = 1e-4

CFG = LLMConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(5)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _causal_logits(graphdef, state, embeddings):
    hidden = functional.hidden_states(graphdef, state, jnp.zeros(embeddings.shape[:2], jnp.int32),
                                      attention=dense_attention, input_embeddings=embeddings)
    return nnx.merge(graphdef, state).logits(hidden)


def greedy_reference(graphdef, state, prompt, embeddings, mask, steps):
    """Greedy decoding by re-running the whole cache-free forward for every new token.

    The sequence sits in a fixed-size buffer (one compilation); causal attention keeps the
    zero rows after it from touching the positions read.
    """
    model = nnx.merge(graphdef, state)
    buffer = np.zeros((len(prompt) + steps, embeddings.shape[1]), np.float32)
    buffer[: len(prompt)] = np.where(mask[:, None], embeddings, np.asarray(model.embed_tokens(jnp.asarray(prompt))))
    out = []
    for step in range(steps):
        length = len(prompt) + step
        token = int(jnp.argmax(_causal_logits(graphdef, state, jnp.asarray(buffer)[None])[0, length - 1]))
        out.append(token)
        buffer[length] = np.asarray(model.embed_tokens(jnp.asarray([token])))[0]
    return out


def test_spliced_embeddings_generate_as_the_reference(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (11, 19)]
    # Row 0 carries a media block at positions 3..8 (its ids stay valid placeholders); row 1 is text.
    mask = np.zeros(11, bool)
    mask[3:9] = True
    # The media block must really be used: matching the spliced reference has to differ from answering with the
    # placeholders' own embeddings. Whether six random embeddings change a tiny random model's six greedy tokens
    # is chance, so draw until they do.
    plain = gen.generate(graphdef, state, [prompts[0]], max_new_tokens=6)[0]
    for _ in range(20):
        media = rng.normal(0, 0.5, (11, CFG.hidden_size)).astype(np.float32)
        want = greedy_reference(graphdef, state, prompts[0], media, mask, 6)
        if want != plain:
            break
    else:
        pytest.fail("no draw of media embeddings changed the greedy answer")
    got = gen.generate(graphdef, state, prompts, max_new_tokens=6, input_embeddings=[media, None],
                       embedding_masks=[mask, None])
    assert got[0] == want
    assert got[1] == gen.generate(graphdef, state, [prompts[1]], max_new_tokens=6)[0]


def test_a_full_mask_is_the_default(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng()
    prompt = list(rng.integers(0, CFG.vocab_size, 7))
    embeds = rng.normal(0, 0.5, (7, CFG.hidden_size)).astype(np.float32)
    assert gen.generate(graphdef, state, [prompt], max_new_tokens=4, input_embeddings=[embeds]) == gen.generate(
        graphdef, state, [prompt], max_new_tokens=4, input_embeddings=[embeds], embedding_masks=[np.ones(7, bool)])


@pytest.mark.parametrize("kwargs,match", [
    ({"input_embeddings": [np.zeros((4, CFG.hidden_size))]}, "shape"),
    ({"input_embeddings": [np.zeros((5, CFG.hidden_size + 1))]}, "shape"),
    ({"input_embeddings": [None, None]}, "entries"),
    ({"input_embeddings": [np.zeros((5, CFG.hidden_size))], "embedding_masks": [np.ones(4, bool)]}, "embedding_masks"),
    ({"embedding_masks": [np.ones(5, bool)]}, "without input_embeddings"),
])
def test_bad_embeddings(split_model, kwargs, match):
    graphdef, state = split_model
    with pytest.raises(ValueError, match=match):
        gen.generate(graphdef, state, [[1, 2, 3, 4, 5]], max_new_tokens=2, **kwargs)


# ---- NVILA against the PyTorch reference -----------------------------------------------------------


@pytest.fixture(scope="module")
def nvila_s2(tmp_path_factory):
    """NVILA (Dynamic-S2, 2x2 projector, untied head) written in VILA's layout and loaded by jvila."""
    parts = fx.build_nvila_parts()
    path = fx.write_nvila_dir(parts, tmp_path_factory.mktemp("nvila") / "NVILA-tiny")
    return parts, jvila.load(str(path))


@pytest.fixture(scope="module")
def nvila_lite(tmp_path_factory):
    """NVILA-Lite style: InternVL-style dynamic tiles, 3x3 projector, tied embeddings."""
    parts = fx.build_nvila_parts(projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic",
                                 tie_embeddings=True)
    path = fx.write_nvila_dir(parts, tmp_path_factory.mktemp("nvila") / "NVILA-Lite-tiny")
    return parts, jvila.load(str(path))


def relative_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def torch_blocks(parts, media) -> list[torch.Tensor]:
    """The reference's media blocks for the media items jvila's processing produced."""
    blocks = []
    for item in media:
        if isinstance(item, ImageMedia) and item.grid is not None:
            blocks.append(fx.image_block_dynamic_s2(parts, item.tiles, item.grid))
        elif isinstance(item, ImageMedia):
            blocks += [fx.image_block_single_tile(parts, tile[None]) for tile in item.tiles]
        else:
            blocks.append(fx.video_block(parts, item.frames))
    return blocks


def compare(parts, model, prompt, *, images=(), videos=(), num_frames=None, greedy_steps=6):
    """Spliced embeddings, all logits and greedy tokens of one prompt: jvila vs the reference."""
    built = build_media_prompt(model.tokenizer, model.media_settings, prompt, images=images, videos=videos,
                               num_video_frames=num_frames)
    with torch.no_grad():
        want_embeds = fx.splice(parts, built.token_ids, torch_blocks(parts, built.media))
    ids, embeds, mask = model._media_prompt(prompt, list(images), list(videos), num_frames)
    assert embeds.shape == tuple(want_embeds.shape)
    assert relative_error(embeds, want_embeds.numpy()) < LOGIT_RTOL
    graphdef, state = nnx.split(model.model.llm)
    hidden = functional.hidden_states(graphdef, state, jnp.asarray(ids)[None], attention=dense_attention,
                                      input_embeddings=jnp.asarray(embeds)[None])
    logits = np.asarray(nnx.merge(graphdef, state).logits(hidden)[0])
    want_logits = fx.reference_logits(parts, want_embeds)
    assert relative_error(logits, want_logits) < LOGIT_RTOL
    got = model.generate_token_ids(prompt, images=list(images), videos=list(videos), num_frames=num_frames,
                                   max_tokens=greedy_steps)[0]
    assert got == fx.reference_greedy(parts, want_embeds, greedy_steps, stop_ids=model.tokenizer.eos_ids)
    return built, mask


def test_dynamic_s2_image_matches_torch(nvila_s2, tmp_path):
    parts, model = nvila_s2
    image = fx.write_random_image(tmp_path / "a.png", 97, 61, np.random.default_rng())
    built, mask = compare(parts, model, "What is in the picture?", images=[image])
    (item,) = built.media
    # A wide image: a 3x4 last-scale grid, so 1 + 4 + 12 tiles and 12 blocks of 2x2 tokens (+ "\n").
    assert item.grid == (3, 4) and item.tiles.shape == (17, fx.TILE, fx.TILE, 3)
    assert mask.sum() == 12 * 4 + 1


def test_two_images_are_one_tile_each(nvila_s2, tmp_path):
    parts, model = nvila_s2
    rng = np.random.default_rng()
    images = [fx.write_random_image(tmp_path / f"{i}.png", w, h, rng) for i, (w, h) in enumerate([(40, 33), (29, 71)])]
    built, mask = compare(parts, model, "Compare them.", images=images)
    assert [m.grid for m in built.media] == [None, None] and mask.sum() == 2 * (4 + 1)


def test_video_matches_torch(nvila_s2, tmp_path):
    parts, model = nvila_s2
    video = fx.write_random_video(tmp_path / "clip.mp4", 21, np.random.default_rng())
    built, mask = compare(parts, model, "What happens?", videos=[video], num_frames=16)
    assert built.media[0].frames.shape[0] == 16
    assert mask.sum() == 2 * (4 + 1)  # 16 frames pool into 2 groups of 8, each 2x2 tokens + "\n"


def test_lite_tiles_match_torch(nvila_lite, tmp_path):
    parts, model = nvila_lite
    image = fx.write_random_image(tmp_path / "tall.png", 43, 95, np.random.default_rng())
    built, mask = compare(parts, model, [{"role": "user", "content": [
        {"type": "image", "image": str(image)}, {"type": "text", "text": "Read it."}]}])
    assert len(built.media) > 1 and all(m.mode == "dynamic" for m in built.media)  # tiles + thumbnail
    assert mask.sum() == len(built.media) * (4 + 1)  # 3x3 over a 4x4 map: padded to 6x6, 2x2 tokens


def test_text_only_prompt_on_nvila(nvila_s2):
    parts, model = nvila_s2
    compare(parts, model, "Just text, no media.")


def test_encode_images_matches_torch(nvila_s2, tmp_path):
    parts, model = nvila_s2
    rng = np.random.default_rng()
    one = fx.write_random_image(tmp_path / "one.png", 50, 50, rng)
    two = fx.write_random_image(tmp_path / "two.png", 23, 41, rng)
    (alone,) = model.encode_images(one)  # one image: Dynamic-S2 (a square image → a 3x3 grid)
    pair = model.encode_images([one, two])  # several: one tile each
    settings = model.media_settings
    from jvila.processing.media_prompt import image_media

    with torch.no_grad():
        (item,) = image_media(settings, [one])
        want_alone = fx.image_block_dynamic_s2(parts, item.tiles, item.grid)[:-1].numpy()  # without "\n"
        want_pair = [fx.image_block_single_tile(parts, m.tiles)[:-1].numpy() for m in image_media(settings, [one, two])]
    assert alone.shape == (9 * 4, 64) and relative_error(alone, want_alone) < LOGIT_RTOL
    assert [p.shape for p in pair] == [(4, 64), (4, 64)]
    for got, want in zip(pair, want_pair):
        assert relative_error(got, want) < LOGIT_RTOL
