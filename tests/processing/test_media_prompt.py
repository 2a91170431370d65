"""The multimodal prompt builder against VILA's rules, written out here, on a tokenizer built offline."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import tokenizers
import transformers
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from jvila.processing.errors import MediaError
from jvila.processing.image import SiglipPreprocessor
from jvila.processing.media_prompt import (
    ImageMedia,
    MediaSettings,
    VideoMedia,
    build_media_prompt,
    ensure_media_tokens,
    image_media,
    media_end_token_ids,
)
from jvila.processing.tiling import candidate_grids, closest_grid
from jvila.processing.tokenizer import Tokenizer

# VILA's chat_templates/qwen2.jinja after VILA strips its 4-space indents and line breaks
# (llava/model/language_model/builder.py); "\\n" stays a Jinja escape for a newline.
VILA_QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n"
TILE = 28
SCALES = (28, 56, 84)
PREPROCESSOR_CONFIG = {"size": {"height": TILE, "width": TILE}, "resample": 3, "image_mean": [0.5] * 3,
                       "image_std": [0.5] * 3, "rescale_factor": 1 / 255}


def _user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained on a few sentences, with Qwen2's ChatML specials and VILA's media tokens."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["You are a helpful assistant", "Describe the picture.", "What is in the video?",
              "Compare these two images, please.\n", "system user assistant\n\n"] * 20
    backend.train_from_iterator(corpus, trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    backend.save(str(directory / "plain_tokenizer.json"))  # without media tokens
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<image>", "<vila/video>")])
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": VILA_QWEN2_TEMPLATE,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def tokenizer(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))


def _settings(aspect, **overrides):
    config = {"image_aspect_ratio": aspect, "s2_scales": ",".join(map(str, SCALES)), "max_tiles": 12,
              "min_tiles": 1, "num_video_frames": 4} | overrides
    return MediaSettings.from_config(config, PREPROCESSOR_CONFIG)


def _image(rng, width, height):
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _siglip(images):
    reference = SiglipImageProcessorPil(**PREPROCESSOR_CONFIG)
    return np.stack([np.moveaxis(reference(im, return_tensors="np")["pixel_values"][0], 0, -1) for im in images])


def _cut(image, cols, rows):
    pixels = np.asarray(image.resize((cols * TILE, rows * TILE)))
    return [PIL.Image.fromarray(pixels[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE])
            for r in range(rows) for c in range(cols)]


def _ids(tokenizer, hf_tokenizer, expected_text, prompt):
    assert prompt.text == expected_text
    assert prompt.token_ids == hf_tokenizer(expected_text)["input_ids"]
    image_id, video_id = tokenizer.token_to_id("<image>"), tokenizer.token_to_id("<vila/video>")
    return [{image_id: "image", video_id: "video"}[t] for t in prompt.token_ids if t in (image_id, video_id)]


def test_single_image_dynamic_s2(tokenizer, hf_tokenizer):
    rng = np.random.default_rng()
    image = _image(rng, 97, 41)
    prompt = build_media_prompt(tokenizer, _settings("dynamic_s2"), "  Describe the picture. ", images=[image])
    # One <image> straight before the text, no "\n" after it; only the message's ends are stripped.
    expected_text = SYSTEM + _user("<image>  Describe the picture.") + ASSISTANT
    assert _ids(tokenizer, hf_tokenizer, expected_text, prompt) == ["image"]
    [media] = prompt.media
    cols, rows = closest_grid(97, 41, candidate_grids(9, 12), TILE)
    assert isinstance(media, ImageMedia) and media.mode == "dynamic_s2" and media.grid == (rows, cols)
    expected = _siglip(_cut(image, 1, 1) + _cut(image, 2, 2) + _cut(image, cols, rows))
    np.testing.assert_array_equal(media.tiles, expected)


def test_several_images_are_single_tiles(tokenizer, hf_tokenizer):
    rng = np.random.default_rng()
    images = [_image(rng, 61, 33), _image(rng, 20, 90)]
    for aspect in ("dynamic_s2", "dynamic"):
        prompt = build_media_prompt(tokenizer, _settings(aspect), "Compare these two images, please.", images=images)
        expected_text = SYSTEM + _user("<image><image>Compare these two images, please.") + ASSISTANT
        assert _ids(tokenizer, hf_tokenizer, expected_text, prompt) == ["image", "image"]
        for i, (media, image) in enumerate(zip(prompt.media, images)):
            assert media.mode == "single" and media.grid is None and media.image_index == i
            # Straight to the processor, which resizes with its own filter.
            np.testing.assert_array_equal(media.tiles, _siglip([image]))


def test_resize_mode_resizes_with_pil_default_first():
    rng = np.random.default_rng()
    image = _image(rng, 77, 45)
    [media] = image_media(_settings("resize"), [image])
    np.testing.assert_array_equal(media.tiles, _siglip([image.resize((TILE, TILE), PIL.Image.Resampling.BICUBIC)]))
    [media] = image_media(_settings("resize", max_tiles=2), [image])  # tiling settings play no part
    assert media.tiles.shape == (1, TILE, TILE, 3)


def test_lite_repeats_image_token_per_tile(tokenizer, hf_tokenizer):
    rng = np.random.default_rng()
    image = _image(rng, 83, 29)
    settings = _settings("dynamic")
    cols, rows = closest_grid(83, 29, candidate_grids(1, 12), TILE)
    tiles = _cut(image, cols, rows) + [image.resize((TILE, TILE))]
    n = len(tiles)
    assert n > 2
    prompt = build_media_prompt(tokenizer, settings, "What is in the video?", images=[image])
    expected_text = SYSTEM + _user("<image>\n" * n + "What is in the video?") + ASSISTANT
    assert _ids(tokenizer, hf_tokenizer, expected_text, prompt) == ["image"] * n
    assert [m.mode for m in prompt.media] == ["dynamic"] * n and all(m.grid is None for m in prompt.media)
    np.testing.assert_array_equal(np.concatenate([m.tiles for m in prompt.media]), _siglip(tiles))
    # With the image last, the stripped message loses the final "\n".
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "image": image}]}]
    prompt = build_media_prompt(tokenizer, settings, messages)
    assert prompt.text == SYSTEM + _user("Describe" + "<image>\n" * (n - 1) + "<image>") + ASSISTANT


def test_chat_messages_with_image_and_video(tokenizer, hf_tokenizer, tmp_path):
    rng = np.random.default_rng()
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [_image(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))) for _ in range(7)]
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:02d}.png")
    image = _image(rng, 50, 50)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {"role": "system", "content": "You describe media."},
        {"role": "user", "content": "What is in the video?"},
        {"role": "assistant", "content": "Nothing yet.", "tool_calls": None},
        {"role": "user", "content": [
            {"type": "video", "video": str(folder)},
            "Compare with",
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": " the picture <image> please. "},
        ]},
    ]
    for aspect in ("resize", "dynamic_s2"):
        prompt = build_media_prompt(tokenizer, _settings(aspect), messages)
        # A media token typed in text is removed and that text part stripped; no default system prompt.
        expected_text = ("<|im_start|>system\nYou describe media.<|im_end|>\n" + _user("What is in the video?")
                         + "<|im_start|>assistant\nNothing yet.<|im_end|>\n"
                         + _user("<vila/video>Compare with<image>the picture  please.") + ASSISTANT)
        assert _ids(tokenizer, hf_tokenizer, expected_text, prompt) == ["video", "image"]
        video, picture = prompt.media
        assert isinstance(video, VideoMedia) and isinstance(picture, ImageMedia)
        # The lone image is Dynamic-S2 in a dynamic_s2 checkpoint even with a video beside it.
        assert picture.mode == ("dynamic_s2" if aspect == "dynamic_s2" else "single")
        chosen = [frames[i] for i in (0, 2, 4, 6)]  # round(linspace(0, 6, 4))
        if aspect == "resize":
            chosen = [f.resize((TILE, TILE)) for f in chosen]
        np.testing.assert_array_equal(video.frames, _siglip(chosen))
    prompt = build_media_prompt(tokenizer, _settings("resize"), messages, num_video_frames=2)
    assert prompt.media[0].frames.shape == (2, TILE, TILE, 3)


def test_hf_renders_the_same_text(tokenizer, hf_tokenizer):
    # The hand-written expectation above agrees with transformers' rendering of VILA's template.
    hf_tokenizer.chat_template = VILA_QWEN2_TEMPLATE
    image = _image(np.random.default_rng(), 30, 30)
    prompt = build_media_prompt(tokenizer, _settings("resize"), "Describe the picture.", images=[image])
    conversation = [{"role": "user", "content": "<image>Describe the picture."}]
    assert prompt.text == hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_media_tokens_are_added_when_missing(tokenizer_dir):
    files = {"tokenizer.json": (tokenizer_dir / "plain_tokenizer.json").read_text(),
             "tokenizer_config.json": (tokenizer_dir / "tokenizer_config.json").read_text()}
    tokenizer = Tokenizer.from_files(files)
    assert tokenizer.token_to_id("<image>") is None
    size = tokenizer.vocab_size
    ids = ensure_media_tokens(tokenizer)
    assert sorted(ids.values()) == [size, size + 1]
    assert tokenizer.encode("a<image>b<vila/video>", add_special_tokens=False).count(ids["image"]) == 1
    assert ensure_media_tokens(tokenizer) == ids and tokenizer.vocab_size == size + 2
    assert media_end_token_ids(tokenizer) == tokenizer.encode("\n") and len(media_end_token_ids(tokenizer)) == 1


def test_settings_from_config():
    settings = MediaSettings.from_config(
        {"image_aspect_ratio": "dynamic_s2", "s2_scales": "448,896,1344", "max_tiles": 12, "num_video_frames": 32},
        {"size": {"height": 384, "width": 384}},
    )
    # A Dynamic-S2 tower resizes to its first scale, whatever the processor config says.
    assert settings.preprocessor.size == (448, 448) and settings.s2_scales == (448, 896, 1344)
    assert settings.num_video_frames == 32 and settings.min_tiles == 1
    plain = MediaSettings.from_config({"image_aspect_ratio": "resize"}, SiglipPreprocessor.from_config({}))
    assert plain.preprocessor.size == (224, 224)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        MediaSettings.from_config({"image_aspect_ratio": "pad"}, {})


def test_bad_prompts_are_media_errors(tokenizer, tmp_path):
    settings = _settings("resize")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(MediaError, match="bad.png"):
        build_media_prompt(tokenizer, settings, "hi", images=[str(bad)])
    with pytest.raises(MediaError, match="unsupported content part type 'audio'"):
        build_media_prompt(tokenizer, settings, [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}])
    with pytest.raises(MediaError, match="names no image"):
        build_media_prompt(tokenizer, settings, [{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(MediaError, match="no chat message has the user role"):
        build_media_prompt(tokenizer, settings, [{"role": "system", "content": "x"}], images=[bad])
    with pytest.raises(MediaError, match="a prompt is a string"):
        build_media_prompt(tokenizer, settings, 42)
    with pytest.raises(MediaError, match="remote URLs"):
        build_media_prompt(tokenizer, settings, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
