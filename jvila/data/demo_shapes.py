"""The embedded demo dataset: coloured shapes on a plain background, generated on the fly.

Every image is small (32 px by default) and unambiguous: saturated colours far apart from each
other, shapes that never overlap and never straddle the middle lines. Four question types:

- "colour":   one shape — "What colour is the shape?" -> a colour word ("red").
- "count":    1-4 shapes of one colour and kind, one per quadrant — "How many shapes are there?"
              -> a number word ("three").
- "position": one shape well inside one half — "Is the shape on the left or the right?" -> "left"
              (or top/bottom).
- "caption":  any of the above images — "Describe the image." -> "two blue circles".

`write_demo_dataset` writes PNGs and LLaVA/VILA JSON lines, so the demo reads its data through
the same path as real training data, plus an eval file whose records also carry "type" and
"answer". The eval split is disjoint from the train split: no (question, image) pair of eval
appears in train. `demo_tokenizer_files` trains a small byte-level BPE on the demo's own text,
with Qwen2's ChatML template and VILA's media tokens; `demo_photos` lists real photographs that
matplotlib ships, for the demo's last answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import PIL.Image
import PIL.ImageDraw

# Saturated and far apart: every pair differs by at least ~200 in RGB (a purple next to this blue
# was the pair a tiny model confused longest).
COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 170, 20),
    "blue": (20, 40, 230),
    "yellow": (240, 220, 0),
    "pink": (230, 40, 220),
}
SHAPES = ("square", "circle", "triangle")
NUMBER_WORDS = ("one", "two", "three", "four")
QUESTION_TYPES = ("colour", "count", "position", "caption")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "count": "How many shapes are there?",
    "left_right": "Is the shape on the left or the right?",
    "top_bottom": "Is the shape at the top or the bottom?",
    "caption": "Describe the image.",
}
BACKGROUND = (255, 255, 255)

IMAGE_TOKEN, VIDEO_TOKEN, SENTINEL_TOKEN = "<image>", "<vila/video>", "<vila/sentinel>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2's ChatML, with the assistant's text (and its <|im_end|>) marked as a {% generation %} block,
# as transformers' assistant-mask templates do. One line: no stray newlines from the Jinja layout.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# General questions the demo asks about real photos; in the tokenizer's corpus so they encode compactly.
PHOTO_QUESTIONS = ("What is in this picture?", "Describe the photo.", "What colour is it?")


@dataclasses.dataclass(frozen=True)
class DemoSample:
    """One generated example: the image, its question type, the question and the one-phrase answer."""

    image: PIL.Image.Image
    question_type: str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """Where `write_demo_dataset` put things. Image paths in the JSON lines are relative to image_root."""

    train: pathlib.Path
    eval: pathlib.Path
    image_root: pathlib.Path


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else kind + "s"


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _box_in(rng: np.random.Generator, region: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """A size x size box placed at random inside region (x0, y0, x1, y1), a 1 px margin kept."""
    x0, y0, x1, y1 = region
    x = int(rng.integers(x0 + 1, max(x0 + 2, x1 - size)))
    y = int(rng.integers(y0 + 1, max(y0 + 2, y1 - size)))
    return (x, y, x + size, y + size)


def _render(image_size: int, shapes: list[tuple[str, str, tuple[int, int, int, int]]]) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for kind, colour, box in shapes:
        _draw_shape(draw, kind, box, COLOURS[colour])
    return image


def make_sample(rng: np.random.Generator, question_type: str, image_size: int = 32) -> DemoSample:
    """One random sample of `question_type` ("colour", "count", "position" or "caption")."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px for shapes to stay recognisable, got {image_size}")
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; known: {QUESTION_TYPES}")
    scene = question_type if question_type != "caption" else str(rng.choice(["colour", "count", "position"]))
    kind, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    s, half = image_size, image_size // 2
    if scene == "colour":
        size = int(rng.integers(s // 2, s * 3 // 4 + 1))  # large: many patches of pure colour
        shapes = [(kind, colour, _box_in(rng, (0, 0, s, s), size))]
        question, answer, caption = QUESTIONS["colour"], colour, f"a {colour} {kind}"
    elif scene == "count":
        count = int(rng.integers(1, 5))
        # One shape per quadrant: shapes never overlap and stay countable at any size.
        quadrants = rng.permutation(4)[:count]
        size = max(5, s * 5 // 16)
        shapes = [(kind, colour, _box_in(rng, ((q % 2) * half, (q // 2) * half, (q % 2 + 1) * half,
                                                (q // 2 + 1) * half), size)) for q in quadrants]
        word = NUMBER_WORDS[count - 1]
        question, answer, caption = QUESTIONS["count"], word, f"{word} {colour} {_plural(kind, count)}"
    else:
        size = max(5, s * 5 // 16)
        axis = str(rng.choice(["left_right", "top_bottom"]))
        side = int(rng.integers(2))
        # The shape sits wholly inside one half, away from the middle line.
        lo, hi = (0, half - 2) if side == 0 else (half + 2, s)
        region = (lo, 0, hi, s) if axis == "left_right" else (0, lo, s, hi)
        shapes = [(kind, colour, _box_in(rng, region, size))]
        answer = ("left", "right")[side] if axis == "left_right" else ("top", "bottom")[side]
        question, caption = QUESTIONS[axis], f"a {colour} {kind} on the {answer}"
    image = _render(image_size, shapes)
    if question_type == "caption":
        return DemoSample(image, "caption", QUESTIONS["caption"], caption)
    return DemoSample(image, question_type, question, answer)


def _key(sample: DemoSample) -> str:
    return hashlib.sha1(sample.question.encode() + sample.image.tobytes()).hexdigest()


def _record(record_id: str, image_path: str, sample: DemoSample, *, with_answer_fields: bool) -> dict:
    record = {
        "id": record_id,
        "image": image_path,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
    }
    if with_answer_fields:
        record |= {"type": sample.question_type, "question": sample.question, "answer": sample.answer}
    return record


def write_demo_dataset(directory, *, num_train: int = 2000, num_eval: int = 200, seed: int = 0,
                       image_size: int = 32, caption_fraction: float = 0.1) -> DemoDataset:
    """Write DIR/images/*.png, DIR/train.jsonl and DIR/eval.jsonl; deterministic given the arguments.

    Question types cycle colour, count, position (captions replace `caption_fraction` of the train
    examples); eval holds colour/count/position questions in equal shares and no train duplicate.
    """
    if num_train < 1 or num_eval < 0:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 0, got {num_train} and {num_eval}")
    if not 0 <= caption_fraction < 1:
        raise ValueError(f"caption_fraction must lie in [0, 1), got {caption_fraction}")
    root = pathlib.Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    asked = ("colour", "count", "position")
    seen = set()
    train_path, eval_path = root / "train.jsonl", root / "eval.jsonl"
    with open(train_path, "w", encoding="utf-8") as out:
        for i in range(num_train):
            kind = "caption" if rng.random() < caption_fraction else asked[i % 3]
            sample = make_sample(rng, kind, image_size)
            seen.add(_key(sample))
            name = f"images/train-{i:06d}.png"
            sample.image.save(root / name)
            out.write(json.dumps(_record(f"train-{i:06d}", name, sample, with_answer_fields=False)) + "\n")
    eval_rng = np.random.default_rng([seed, 1])  # its own stream: eval does not shift with num_train
    with open(eval_path, "w", encoding="utf-8") as out:
        for i in range(num_eval):
            for _ in range(1000):
                sample = make_sample(eval_rng, asked[i % 3], image_size)
                if _key(sample) not in seen:
                    break
            else:
                raise RuntimeError("could not draw an eval sample unseen in train; use a larger image_size")
            seen.add(_key(sample))
            name = f"images/eval-{i:06d}.png"
            sample.image.save(root / name)
            out.write(json.dumps(_record(f"eval-{i:06d}", name, sample, with_answer_fields=True)) + "\n")
    return DemoDataset(train=train_path, eval=eval_path, image_root=root)


def demo_corpus() -> list[str]:
    """Every phrase the demo's conversations use, and the chat template's fixed text."""
    lines = [SYSTEM_PROMPT, "system", "user", "assistant", *QUESTIONS.values(), *PHOTO_QUESTIONS]
    # Replies start a line (after "assistant\n"): each one-word answer on its own, so it is one token.
    lines += [*COLOURS, *NUMBER_WORDS, "left", "right", "top", "bottom"]
    for colour in COLOURS:
        for kind in SHAPES:
            lines.append(f"a {colour} {kind}")
            for side in ("left", "right", "top", "bottom"):
                lines.append(f"a {colour} {kind} on the {side}")
            for count, word in enumerate(NUMBER_WORDS, 1):
                lines.append(f"{word} {colour} {_plural(kind, count)}")
    return lines


def demo_tokenizer_files(vocab_size: int = 400) -> dict[str, str]:
    """A byte-level BPE trained on the demo corpus, with ChatML and VILA's media tokens (offline).

    Any text still encodes (byte-level); the demo's phrases take few tokens. The files are what
    `jvila.processing.tokenizer.Tokenizer.from_files` reads and what a checkpoint's tokenizer dir holds.
    """
    # Repeated: every phrase is frequent enough to merge.
    return bpe_tokenizer_files(demo_corpus() * 4, vocab_size=vocab_size, chat_template=CHAT_TEMPLATE)


def bpe_tokenizer_files(corpus: list[str], *, vocab_size: int, chat_template: str) -> dict[str, str]:
    """Qwen2-style tokenizer files for a byte-level BPE trained on `corpus`: ChatML's special tokens, then
    VILA's media tokens, appended after the base vocabulary as VILA's builder does
    (llava/model/language_model/builder.py)."""
    import tokenizers  # local: the worker-side modules of jvila.data do not need it

    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator(corpus, trainer)
    model.add_special_tokens([IMAGE_TOKEN, VIDEO_TOKEN, SENTINEL_TOKEN])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
        "model_max_length": 4096,
    }
    return {"tokenizer.json": model.to_str(), "tokenizer_config.json": json.dumps(config)}


def demo_photos() -> list[pathlib.Path]:
    """Paths of real photographs shipped with matplotlib (Grace Hopper's portrait, a gift box)."""
    from matplotlib import cbook

    names = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
    return [pathlib.Path(cbook.get_sample_data(name, asfileobj=False)) for name in names]
