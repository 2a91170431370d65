"""`jvila.load` for text models, the `jvila generate` media flags, and bad input at both front doors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jvila
import nvila_fixture as fx
from jvila.cli import main
from jvila.processing.errors import MediaError
from tiny_hf import randomize, transformers_greedy


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny Qwen2 Hugging Face directory with a ChatML tokenizer."""
    files = fx.build_tokenizer_files()
    config = transformers.Qwen2Config(vocab_size=331, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = randomize(transformers.Qwen2ForCausalLM(config))
    path = tmp_path_factory.mktemp("text") / "qwen2-tiny"
    model.save_pretrained(path)
    for name, content in files.items():
        (path / name).write_text(content)
    return path, model


@pytest.fixture(scope="module")
def nvila_dir(tmp_path_factory):
    parts = fx.build_nvila_parts()
    return parts, fx.write_nvila_dir(parts, tmp_path_factory.mktemp("nvila") / "NVILA-tiny")


def test_text_model_loads_and_generates_like_transformers(text_dir):
    path, hf_model = text_dir
    model = jvila.load(str(path))
    assert not model.is_multimodal and model.config.num_layers == 2
    prompts = ["Describe the window.", "How many apples?"]
    got = model.generate_token_ids(prompts, max_tokens=7)
    for prompt, row in zip(prompts, got):
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        assert row == transformers_greedy(hf_model, ids, 7, model.tokenizer.eos_ids)
    # A string prompt is a list of one; generate decodes what generate_token_ids returns.
    assert model.generate(prompts[0], max_tokens=7) == [model.tokenizer.decode(got[0])]


def test_text_model_takes_no_media(text_dir, tmp_path):
    model = jvila.load(str(text_dir[0]))
    image = fx.write_random_image(tmp_path / "a.png", 20, 20, np.random.default_rng())
    with pytest.raises(MediaError, match="text model"):
        model.generate("hi", images=[image])
    with pytest.raises(MediaError, match="text model"):
        model.encode_images([image])


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": ["a", "b"], "images": [["x.png"]]}, "list of 2 entries"),
    ({"prompts": ["a", "b"], "videos": "clip.mp4"}, "list of 2 entries"),
    ({"prompts": [], "images": None}, "at least one prompt"),
    ({"prompts": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompts": "a", "num_frames": 0}, "num_frames"),
    ({"prompts": [{"role": "user", "content": "a"}], "system": "s"}, "system"),
])
def test_generate_argument_errors(nvila_dir, kwargs, match):
    model = jvila.load(str(nvila_dir[1]))
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        jvila.load("anything", dtype="float16")


def test_more_images_than_placeholders(nvila_dir, tmp_path):
    """A chat template that drops the user's content leaves the image without its placeholder."""
    src = tmp_path / "broken"
    shutil.copytree(nvila_dir[1], src)
    config_file = src / "llm" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
    config_file.write_text(json.dumps(config))
    model = jvila.load(str(src))
    image = fx.write_random_image(tmp_path / "a.png", 30, 30, np.random.default_rng())
    with pytest.raises(MediaError, match="placeholders"):
        model.generate("hi", images=[image])


# ---- the command line ------------------------------------------------------------------------------


def test_cli_image_prompt_prints_what_the_library_returns(nvila_dir, tmp_path, capsys):
    rng = np.random.default_rng()
    images = [fx.write_random_image(tmp_path / f"{i}.png", 35 + 9 * i, 27, rng) for i in range(2)]
    args = ["generate", "--model", str(nvila_dir[1]), "--max-tokens", "5"]
    assert main(args + ["--image", str(images[0]), "--image", str(images[1]), "Compare."]) == 0
    out = capsys.readouterr().out
    want = jvila.load(str(nvila_dir[1])).generate("Compare.", images=images, max_tokens=5)[0]
    assert out == want + "\n"


def test_cli_video_with_frames(nvila_dir, tmp_path, capsys):
    video = fx.write_random_video(tmp_path / "clip.mp4", 12, np.random.default_rng())
    args = ["generate", "--model", str(nvila_dir[1]), "--max-tokens", "4", "--video", str(video), "--frames", "16"]
    assert main(args + ["What happens?"]) == 0
    out = capsys.readouterr().out
    want = jvila.load(str(nvila_dir[1])).generate("What happens?", videos=[video], num_frames=16, max_tokens=4)[0]
    assert out == want + "\n"


def error_of(capsys, args, code=1) -> str:
    assert main(args) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("jvila: error: ")
    assert "Traceback" not in captured.err
    return captured.err


def test_cli_missing_subfolder(nvila_dir, tmp_path, capsys):
    src = tmp_path / "incomplete"
    shutil.copytree(nvila_dir[1], src)
    jvila.load(str(src))  # converted into the cache while complete
    shutil.rmtree(src / "mm_projector")
    # The cached conversion must not stand in for a directory that changed since.
    assert "mm_projector/" in error_of(capsys, ["generate", "--model", str(src), "hi"])


def test_cli_bad_images(nvila_dir, tmp_path, capsys):
    model = ["generate", "--model", str(nvila_dir[1]), "--max-tokens", "2"]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng().integers(0, 256, 300, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (garbage, empty, tmp_path / "missing.png"):
        assert path.name in error_of(capsys, model + ["--image", str(path), "hi"])


def test_cli_zero_size_image(nvila_dir, tmp_path, capsys):
    """A PNG declaring a 0x5-pixel image (PIL writes none, so it is built by hand; PIL refuses it on open)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)) + chunk(
        b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "zero.png").write_bytes(png)
    err = error_of(capsys, ["generate", "--model", str(nvila_dir[1]), "--image", str(tmp_path / "zero.png"), "hi"])
    assert "zero.png" in err


def test_cli_bad_video_and_flags(nvila_dir, text_dir, tmp_path, capsys):
    model = ["generate", "--model", str(nvila_dir[1]), "--max-tokens", "2"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    assert "broken.mp4" in error_of(capsys, model + ["--video", str(broken), "hi"])
    assert "--frames" in error_of(capsys, model + ["--frames", "8", "hi"], code=2)
    video = fx.write_random_video(tmp_path / "ok.mp4", 4, np.random.default_rng())
    assert "--frames" in error_of(capsys, model + ["--video", str(video), "--frames", "0", "hi"], code=2)
    image = fx.write_random_image(tmp_path / "a.png", 20, 20, np.random.default_rng())
    assert "text model" in error_of(capsys, ["generate", "--model", str(text_dir[0]), "--image", str(image), "hi"])


def test_bfloat16_nvila_follows_float32(nvila_dir, tmp_path):
    image = fx.write_random_image(tmp_path / "a.png", 50, 40, np.random.default_rng())
    (want,) = jvila.load(str(nvila_dir[1])).encode_images(image)
    (got,) = jvila.load(str(nvila_dir[1]), dtype="bfloat16").encode_images(image)
    assert got.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding); a few roundings through the
    # tower and projector stay well inside 3e-2, while a wrong cast or layout would not.
    assert np.abs(got.astype(np.float32) - want).max() / np.abs(want).max() < 3e-2


def test_server_answers_an_image_as_the_library_does(nvila_dir, tmp_path):
    """`jvila serve` on an NVILA directory: a chat message with a data: URL image takes the same
    media path as `jvila.load(...).generate` and gives the same greedy tokens."""
    import base64

    import openai

    from serving.api_server import ServerThread
    from serving.launch import EngineOptions, build_app

    image = fx.write_random_image(tmp_path / "photo.png", 61, 43, np.random.default_rng())
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    want = jvila.load(str(nvila_dir[1])).generate("What is this?", images=[image], max_tokens=6)[0]
    app, engine = build_app(str(nvila_dir[1]), served_name="nvila", scheduler="fcfs",
                            options=EngineOptions(num_pages=64, page_size=16, max_running=2, token_budget=64))
    server = ServerThread(app).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="nvila", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}])
    finally:
        server.stop()
    assert reply.choices[0].message.content == want
    assert engine.metrics()["pages_used"] == 0
