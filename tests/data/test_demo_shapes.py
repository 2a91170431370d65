"""The demo dataset: every answer read back from the pixels, determinism, a disjoint eval split, the tokenizer."""

import collections
import hashlib
import json

import numpy as np
import PIL.Image
import pytest

from jvila.data.demo_shapes import (
    COLOURS, NUMBER_WORDS, QUESTIONS, demo_photos, demo_tokenizer_files, write_demo_dataset)
from jvila.processing.image import load_rgb
from jvila.processing.tokenizer import Tokenizer


def _components(foreground: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean image, each as an array of (y, x)."""
    seen = np.zeros_like(foreground)
    parts = []
    for start in zip(*np.nonzero(foreground)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < foreground.shape[0] and 0 <= nx < foreground.shape[1] and foreground[ny, nx] \
                            and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        parts.append(np.array(pixels))
    return parts


def _read_back(image: PIL.Image.Image, question: str) -> str:
    """The answer the pixels give, computed without the generator's own bookkeeping."""
    pixels = np.asarray(image).astype(int)
    foreground = np.any(pixels != 255, axis=-1)
    parts = _components(foreground)
    if question == QUESTIONS["count"]:
        return NUMBER_WORDS[len(parts) - 1]
    assert len(parts) == 1, "colour and position images hold one shape"
    if question == QUESTIONS["colour"]:
        mean = pixels[foreground].mean(axis=0)
        return min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())
    centre = parts[0].mean(axis=0)  # (y, x)
    middle = (image.size[0] - 1) / 2
    if question == QUESTIONS["left_right"]:
        return "left" if centre[1] < middle else "right"
    return "top" if centre[0] < middle else "bottom"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=150, num_eval=45, seed=7, image_size=32)


def test_every_answer_matches_the_pixels(dataset):
    train, evaluation = _records(dataset.train), _records(dataset.eval)
    assert len(train) == 150 and len(evaluation) == 45
    for record in train + evaluation:
        question = record["conversations"][0]["value"]
        assert question.startswith("<image>\n")
        question = question.removeprefix("<image>\n")
        answer = record["conversations"][1]["value"]
        image = load_rgb(dataset.image_root / record["image"])
        assert image.size == (32, 32)
        if question == QUESTIONS["caption"]:
            assert any(colour in answer for colour in COLOURS)
            continue
        assert _read_back(image, question) == answer, record["id"]
    types = collections.Counter(r["type"] for r in evaluation)
    assert types == {"colour": 15, "count": 15, "position": 15}
    for record in evaluation:
        assert record["answer"] == record["conversations"][1]["value"]
        assert record["question"] == record["conversations"][0]["value"].removeprefix("<image>\n")
    # All answers of each kind occur in train (a learnable task needs every class seen).
    answers = collections.Counter(r["conversations"][1]["value"] for r in train)
    for word in (*COLOURS, *NUMBER_WORDS, "left", "right", "top", "bottom"):
        assert answers[word] > 0, word


def test_eval_split_is_disjoint_from_train(dataset):
    def keys(records):
        return {hashlib.sha1(r["conversations"][0]["value"].encode() +
                             load_rgb(dataset.image_root / r["image"]).tobytes()).hexdigest() for r in records}

    assert not keys(_records(dataset.train)) & keys(_records(dataset.eval))


def test_deterministic_by_seed(tmp_path, dataset):
    again = write_demo_dataset(tmp_path / "again", num_train=150, num_eval=45, seed=7, image_size=32)
    other = write_demo_dataset(tmp_path / "other", num_train=150, num_eval=45, seed=8, image_size=32)
    assert again.train.read_text() == dataset.train.read_text()
    assert again.eval.read_text() == dataset.eval.read_text()
    for name in ("images/train-000003.png", "images/eval-000010.png"):
        assert (again.image_root / name).read_bytes() == (dataset.image_root / name).read_bytes()
    assert other.train.read_text() != dataset.train.read_text()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train"):
        write_demo_dataset("/nonexistent-never-created", num_train=0)
    with pytest.raises(ValueError, match="image_size"):
        write_demo_dataset("/nonexistent-never-created", num_train=1, image_size=8)


def test_tokenizer_and_photos():
    tokenizer = Tokenizer.from_files(demo_tokenizer_files())
    for token in ("<image>", "<vila/video>", "<|im_end|>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.token_to_id(token)]
    assert len(tokenizer.encode("\n")) == 1
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_ids and tokenizer.pad_id is not None
    for word in (*COLOURS, *NUMBER_WORDS, "left", "right", "top", "bottom"):
        assert len(tokenizer.encode(word)) == 1, word  # one-word answers are one token: quick to learn
    text = "A photo of Grace Hopper, 1984 — ünïcödé!"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: any text encodes
    photos = demo_photos()
    assert len(photos) == 2
    for photo in photos:
        image = load_rgb(photo)
        assert min(image.size) > 100
