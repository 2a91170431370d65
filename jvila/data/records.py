"""Conversation records as LLaVA/VILA training files hold them, read and validated.

A record (one JSON object per line of a .jsonl file, or the items of a .json list):

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4",
     "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\nWhat is ...?"}, ...]}

Image paths are relative to an image root (absolute paths stay as they are). OpenAI-style records
are read too: {"id", "messages": [{"role", "content": str | [{"type": "text", "text"},
{"type": "image", "image": path}, {"type": "video", "video": path}]}], "images": [...],
"videos": [...]}; image and video parts become `<image>` and `<vila/video>` placeholders.
Plain-text records {"id", "text": "...", "image"?: ...} (language-model pretraining, LongVILA's
context extension) learn every token of the text, with no chat template.

LLaVA/VILA records with images are read as VILA's `LLaVADataset` reads them: every `<image>`
placeholder (and a newline beside it) is removed, and the images go first in the first user turn,
right before its text — where the inference prompt builder puts them. A record with placeholders
must have exactly as many as it has images (VILA would train on a mismatch; here it is a bad
record). Videos ("video": path | [paths]) go right after the images as `<vila/video>` placeholders,
one per video (the released NVILA's video token); in a record with videos, `<image>` and `<video>`
placeholders are dropped as VILA drops them (LLaVA-Video's records mark their video with `<image>`).
OpenAI-style and plain-text records keep their placeholders where they are; without any, one per
image, then one per video, goes at the start of the first user turn. Every problem is a
`RecordError` naming the record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<vila/video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A training record that cannot be used; the message starts with the record's id."""

    def __init__(self, record_id: Any, problem: str):
        self.record_id = record_id
        self.problem = problem
        super().__init__(f"record {record_id!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record: its turns (placeholders in place) and media paths, resolved."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    text: str | None = None  # a plain-text record (then turns is empty)


def read_record_file(path: str | os.PathLike) -> list[str]:
    """The raw records of one file as JSON texts: each line of a .jsonl file (blank lines dropped), or
    each item of a .json list. Lines are parsed later, one by one, so one malformed line is one bad
    record, not a failed run."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no record file {path}")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); a .json record file holds one list") from None
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON list of records, got {type(items).__name__}")
        return [json.dumps(item) for item in items]
    with open(path, encoding="utf-8") as lines:
        return [line for line in (raw.strip() for raw in lines) if line]


def parse_record(raw: str | dict, image_root: str | os.PathLike | None = None, *, fallback_id: Any = None) -> Record:
    """Validate one raw record (its JSON text or the decoded object) and resolve its media paths."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RecordError(fallback_id, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise RecordError(fallback_id, f"a record is a JSON object, got {type(raw).__name__}")
    record_id = raw.get("id", fallback_id)
    record_id = str(record_id) if record_id is not None else None
    root = pathlib.Path(image_root) if image_root is not None else None
    if "text" in raw and "conversations" not in raw and "messages" not in raw:
        return _text_record(record_id, raw, root)
    if "messages" in raw and "conversations" not in raw:
        turns, images, videos = _openai_turns(record_id, raw)
    else:
        turns, images = _llava_turns(record_id, raw), _paths(record_id, raw.get("image"), "image")
        videos = _paths(record_id, raw.get("video"), "video")
        if videos:
            turns = _media_first_with_videos(record_id, turns, len(images), len(videos))
        elif images:
            turns = _media_first(record_id, turns, len(images))
    if not any(turn.role == "assistant" for turn in turns):
        raise RecordError(record_id, "the conversation has no assistant turn: nothing to learn")
    turns = _place_videos(record_id, _place_images(record_id, turns, len(images)), len(videos))
    return Record(record_id, turns, tuple(_resolve(p, root) for p in images),
                  tuple(_resolve(p, root) for p in videos))


def _text_record(record_id, raw: dict, root) -> Record:
    text = raw["text"]
    if not isinstance(text, str) or not text.strip():
        raise RecordError(record_id, "'text' must be a non-empty string")
    images = _paths(record_id, raw.get("image"), "image")
    videos = _paths(record_id, raw.get("video"), "video")
    (turn,) = _place_videos(record_id, _place_images(record_id, (Turn("user", text),), len(images)), len(videos))
    return Record(record_id, (), tuple(_resolve(p, root) for p in images),
                  tuple(_resolve(p, root) for p in videos), turn.text)


def _llava_turns(record_id, raw: dict) -> tuple[Turn, ...]:
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(record_id, "needs a non-empty 'conversations' list (or OpenAI-style 'messages')")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise RecordError(record_id, f"conversations[{i}] must be an object with a string 'value'")
        role = ROLES.get(message.get("from"))
        if role is None:
            raise RecordError(record_id, f"conversations[{i}] has 'from' {message.get('from')!r}; "
                              f"known: {sorted(ROLES)}")
        turns.append(Turn(role, message["value"]))
    return tuple(turns)


def _openai_turns(record_id, raw: dict) -> tuple[tuple[Turn, ...], list, list]:
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(record_id, "'messages' must be a non-empty list")
    images = list(_paths(record_id, raw.get("images", raw.get("image")), "image"))
    videos = list(_paths(record_id, raw.get("videos", raw.get("video")), "video"))
    turns = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.get("role")) if isinstance(message, dict) else None
        if role is None:
            raise RecordError(record_id, f"messages[{i}] needs a role among {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            turns.append(Turn(role, content))
            continue
        if not isinstance(content, list):
            raise RecordError(record_id, f"messages[{i}].content must be a string or a list of parts")
        text = ""
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += part["text"]
            elif kind in ("image", "image_url"):
                images.append(_media_path(part, "image", record_id, i))
                text += IMAGE_PLACEHOLDER
            elif kind in ("video", "video_url"):
                videos.append(_media_path(part, "video", record_id, i))
                text += VIDEO_PLACEHOLDER
            else:
                raise RecordError(record_id, f"messages[{i}] has an unsupported content part {part!r:.80}")
        turns.append(Turn(role, text))
    return tuple(turns), images, videos


def _media_path(part: dict, media: str, record_id: str, message: int) -> str:
    """The path of an OpenAI-style {"type": "image"|"image_url"|"video"|"video_url"} content part."""
    value = part.get(media, part.get("path")) if part["type"] == media else part.get(f"{media}_url")
    value = value.get("url") if isinstance(value, dict) else value
    if not isinstance(value, str):
        article = "an" if media == "image" else "a"
        raise RecordError(record_id, f"messages[{message}] has {article} {media} part without a path")
    return value

def _paths(record_id, value, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise RecordError(record_id, f"'{key}' must be a path or a list of paths")
    return tuple(values)


def _media_first(record_id, turns: tuple[Turn, ...], num_images: int) -> tuple[Turn, ...]:
    """VILA's LLaVA records: placeholders (with a newline beside them) removed from every turn, the images
    put first in the first user turn with nothing between them and the text — as the inference prompt
    builder places them, the "\n" after each image coming from the media block's end embeddings."""
    count = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if count not in (0, num_images):
        raise RecordError(record_id, f"has {count} {IMAGE_PLACEHOLDER} placeholders for {num_images} images")
    first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise RecordError(record_id, "has images but no user turn to put them in")
    turns = tuple(Turn(t.role, _without_placeholders(t.text) if IMAGE_PLACEHOLDER in t.text else t.text)
                  for t in turns)
    turn = turns[first_user]
    return turns[:first_user] + (Turn(turn.role, IMAGE_PLACEHOLDER * num_images + turn.text),) + turns[first_user + 1:]


# What marks a video in LLaVA-style records: LLaVA-Video's records write "<image>" for their video,
# others "<video>"; VILA's own token may be typed too.
VIDEO_RECORD_PLACEHOLDERS = (IMAGE_PLACEHOLDER, "<video>", VIDEO_PLACEHOLDER)


def _media_first_with_videos(record_id, turns: tuple[Turn, ...], num_images: int, num_videos: int
                             ) -> tuple[Turn, ...]:
    """VILA's LLaVADataset on a record with videos: every media placeholder of the kinds above (and a
    newline beside it) leaves every turn, and the images, then the videos, go first in the first user
    turn — where the inference prompt builder puts media given beside a chat. VILA drops placeholders
    whatever their number; here they must be absent, or one per image, per video, or per both."""
    count = sum(turn.text.count(token) for turn in turns for token in VIDEO_RECORD_PLACEHOLDERS)
    if count not in (0, num_images, num_videos, num_images + num_videos):
        raise RecordError(record_id, f"has {count} media placeholders ({', '.join(VIDEO_RECORD_PLACEHOLDERS)}) for "
                          f"{num_images} images and {num_videos} videos")
    first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise RecordError(record_id, "has videos but no user turn to put them in")
    turns = tuple(Turn(t.role, _without_placeholders(t.text, VIDEO_RECORD_PLACEHOLDERS)
                       if any(token in t.text for token in VIDEO_RECORD_PLACEHOLDERS) else t.text) for t in turns)
    turn = turns[first_user]
    media = IMAGE_PLACEHOLDER * num_images + VIDEO_PLACEHOLDER * num_videos
    return turns[:first_user] + (Turn(turn.role, media + turn.text),) + turns[first_user + 1:]


def _without_placeholders(text: str, placeholders: tuple[str, ...] = (IMAGE_PLACEHOLDER,)) -> str:
    for placeholder in placeholders:
        for token in (placeholder + "\n", "\n" + placeholder, placeholder):
            text = text.replace(token, "")
    return text.strip()


def _place_images(record_id, turns: tuple[Turn, ...], num_images: int) -> tuple[Turn, ...]:
    return _place_media(record_id, turns, num_images, IMAGE_PLACEHOLDER, "images")


def _place_videos(record_id, turns: tuple[Turn, ...], num_videos: int) -> tuple[Turn, ...]:
    """Videos go after the first user turn's leading images (media given beside a chat go there at
    inference, images before videos)."""
    return _place_media(record_id, turns, num_videos, VIDEO_PLACEHOLDER, "videos", after=IMAGE_PLACEHOLDER)


def _place_media(record_id, turns: tuple[Turn, ...], num: int, placeholder: str, noun: str,
                 after: str | None = None) -> tuple[Turn, ...]:
    """Turns with one `placeholder` per medium: as written when the record has exactly that many;
    none written: all put at the start of the first user turn (past its leading `after` placeholders)."""
    count = sum(turn.text.count(placeholder) for turn in turns)
    if count == num:
        return turns
    if count:
        raise RecordError(record_id, f"has {count} {placeholder} placeholders for {num} {noun}")
    first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise RecordError(record_id, f"has {noun} but no user turn to put them in")
    text, lead = turns[first_user].text, 0
    while after and text.startswith(after, lead):
        lead += len(after)
    placed = Turn(turns[first_user].role, text[:lead] + placeholder * num + text[lead:])
    return turns[:first_user] + (placed,) + turns[first_user + 1:]


def _resolve(path: str, root: pathlib.Path | None) -> str:
    p = pathlib.Path(path)
    return str(p if p.is_absolute() or root is None else root / p)
