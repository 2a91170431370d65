"""Turn a prompt with images and videos into token ids plus the ordered media the model splices in.

What NVlabs/VILA does, and this module reproduces (`generate_content` in llava/model/llava_arch.py,
`VILAProcessor.__single_call__` in llava/remote_code/auto_processor.py, `extract_media` in
llava/remote_code/media.py, `tokenize_conversation` in llava/utils/tokenizer.py):

- A message's text is its parts joined with no separator: text as given, `<image>` for an image,
  `<vila/video>` for a video. Media tokens typed inside text are removed (and that text part is
  stripped). Every message's text is then stripped, rendered with the tokenizer's chat template
  (NVILA's is ChatML with the default system prompt "You are a helpful assistant"), with the
  generation prompt, and encoded with the tokenizer's special-token handling.
- No "\\n" is written after `<image>` or `<vila/video>` in the text: the "\\n" that follows every media
  block is an embedding the model appends (VILA's BasicImageEncoder/TSPVideoEncoder end token).
- Images, by the checkpoint's `image_aspect_ratio`:
  * exactly one image in the prompt and "dynamic_s2": Dynamic-S2 tiles (tiling.py) and their grid,
    one `<image>` for the whole image;
  * exactly one image and "dynamic" (NVILA-Lite): InternVL-style tiles plus thumbnail, and the
    `<image>` becomes "<image>\\n" once per tile (before the message is stripped), one tile per token;
  * otherwise one tile per image: "resize" first resizes with PIL's default filter to the
    preprocessor's size, any other mode hands the image to the preprocessor as it is.
- Video frames are sampled by video.py and each frame is one tile, as images are in the last case.
- With a Dynamic-S2 model, VILA sets the image processor's size to the first S2 scale; so does
  `MediaSettings.from_config`.

Differences, on purpose: chat messages may carry media in any message (VILA's Lite rewrite only
looks at the first message of a conversation; here it rewrites the message holding the image); a
plain string prompt puts its images, then its videos, before the text, as VILA's CLI does; with
chat messages, media passed separately go before the content of the first user message. Remote
URLs are refused rather than fetched. Videos follow the `<vila/video>` path of the released remote
code (one placeholder per video, frames pooled by the model); VILA's latest main-branch commit
(c7869a6, a server fix for NVILA-15B) instead writes one `<image>` per frame, which is not followed.
VILA's `video_max_tiles > 1` option (tiling each frame; main branch only) is not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import PIL.Image
import tokenizers

from jvila.processing.errors import MediaError
from jvila.processing.image import ImageSource, SiglipPreprocessor, load_rgb, to_rgb
from jvila.processing.tiling import dynamic_s2_tiles, dynamic_tiles
from jvila.processing.tokenizer import Tokenizer
from jvila.processing.video import VideoSource, load_video_frames

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
MEDIA_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
IMAGE_ASPECT_RATIOS = ("dynamic_s2", "dynamic", "resize")


@dataclasses.dataclass(frozen=True)
class ImageMedia:
    """The pixels behind one `<image>` token.

    tiles: [n, H, W, 3] float32, normalized. grid: the last S2 scale's (rows, cols) when mode is
    "dynamic_s2" (tiles ordered scales ascending, row-major within a scale), else None and n == 1.
    mode: "dynamic_s2", "dynamic" (one tile of an NVILA-Lite tiling; the thumbnail is the last) or
    "single". image_index: which image of the prompt (in order) the tiles come from.
    """

    tiles: np.ndarray
    grid: tuple[int, int] | None
    mode: Literal["dynamic_s2", "dynamic", "single"]
    image_index: int


@dataclasses.dataclass(frozen=True)
class VideoMedia:
    """The frames behind one `<vila/video>` token: [T, H, W, 3] float32, normalized, in time order."""

    frames: np.ndarray
    video_index: int


Media = Union[ImageMedia, VideoMedia]


@dataclasses.dataclass(frozen=True)
class MediaPrompt:
    """Token ids with one placeholder id per media item, the media in placeholder order, and the text."""

    token_ids: list[int]
    media: list[Media]
    text: str


@dataclasses.dataclass(frozen=True)
class MediaSettings:
    """How a checkpoint turns pixels into tiles: its image preprocessor and VILA's media options."""

    preprocessor: SiglipPreprocessor
    image_aspect_ratio: str = "resize"
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    min_tiles: int = 1
    max_tiles: int = 12
    num_video_frames: int = 8

    def __post_init__(self):
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {self.image_aspect_ratio!r}; known: {IMAGE_ASPECT_RATIOS}")
        height, width = self.preprocessor.size
        if self.image_aspect_ratio in ("dynamic", "dynamic_s2") and height != width:
            raise ValueError(f"tiling needs a square preprocessor size, got {self.preprocessor.size}")
        if self.num_video_frames < 1:
            raise ValueError(f"num_video_frames must be at least 1, got {self.num_video_frames}")

    @classmethod
    def from_config(
        cls, model_config: Any, preprocessor_config: Mapping[str, Any] | SiglipPreprocessor
    ) -> MediaSettings:
        """From NVILA's top-level config.json (a dict) or a config object with the same field names,
        and the vision tower's preprocessor_config.json (a dict) or a ready preprocessor."""

        def get(key, default):
            value = model_config.get(key) if isinstance(model_config, Mapping) else getattr(model_config, key, None)
            return default if value is None else value

        preprocessor = preprocessor_config
        if not isinstance(preprocessor, SiglipPreprocessor):
            preprocessor = SiglipPreprocessor.from_config(dict(preprocessor_config))
        aspect = get("image_aspect_ratio", "resize")
        scales = get("s2_scales", (448, 896, 1344))
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",")]
        scales = tuple(sorted(int(s) for s in scales))
        if get("dynamic_s2", aspect == "dynamic_s2"):
            # VILA's Dynamic-S2 vision tower resizes every image to the first scale.
            preprocessor = preprocessor.with_size(scales[0])
        return cls(
            preprocessor=preprocessor,
            image_aspect_ratio=aspect,
            s2_scales=scales,
            min_tiles=int(get("min_tiles", 1)),
            max_tiles=int(get("max_tiles", 12)),
            num_video_frames=int(get("num_video_frames", 8)),
        )

    @property
    def tile_size(self) -> int:
        return self.preprocessor.size[0]


def ensure_media_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of `<image>` and `<vila/video>`, added to the tokenizer as special tokens if missing.

    VILA adds both at load time (llava/model/language_model/builder.py); checkpoints saved by VILA
    already hold them, so this only changes tokenizers that come from elsewhere.
    """
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    missing = [token for token in MEDIA_TOKENS.values() if token not in added]
    if missing:
        tokenizer.backend.add_special_tokens(
            [tokenizers.AddedToken(token, special=True, normalized=False) for token in missing]
        )
    return {name: tokenizer.token_to_id(token) for name, token in MEDIA_TOKENS.items()}


def media_end_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids whose embeddings follow every media block: VILA encodes "\\n" with the tokenizer."""
    return tokenizer.encode("\n", add_special_tokens=True)


def single_tile(settings: MediaSettings, image: PIL.Image.Image) -> np.ndarray:
    """[1, H, W, 3]: one image as one tile (several images, video frames, "resize" checkpoints)."""
    image = to_rgb(image)
    if settings.image_aspect_ratio == "resize":
        height, width = settings.preprocessor.size
        image = image.resize((width, height))  # PIL's default filter, as VILA's process_image calls it
    return settings.preprocessor([image])


def image_media(settings: MediaSettings, images: Sequence[ImageSource | PIL.Image.Image]) -> list[ImageMedia]:
    """The media items for the images of one prompt, in order (dynamic modes only for a lone image)."""
    images = [load_rgb(image) for image in images]
    if len(images) == 1 and settings.image_aspect_ratio == "dynamic_s2":
        tiles, grid = dynamic_s2_tiles(images[0], settings.s2_scales, settings.max_tiles, settings.tile_size)
        return [ImageMedia(settings.preprocessor(tiles), grid, "dynamic_s2", 0)]
    if len(images) == 1 and settings.image_aspect_ratio == "dynamic":
        tiles = dynamic_tiles(images[0], settings.min_tiles, settings.max_tiles, settings.tile_size)
        return [ImageMedia(settings.preprocessor([tile]), None, "dynamic", 0) for tile in tiles]
    return [ImageMedia(single_tile(settings, image), None, "single", i) for i, image in enumerate(images)]


def video_media(settings: MediaSettings, video: VideoSource, video_index: int = 0,
                num_frames: int | None = None) -> VideoMedia:
    frames = load_video_frames(video, num_frames or settings.num_video_frames)
    return VideoMedia(np.concatenate([single_tile(settings, frame) for frame in frames]), video_index)


def build_media_prompt(
    tokenizer: Tokenizer,
    settings: MediaSettings,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    images: Sequence[ImageSource] = (),
    videos: Sequence[VideoSource] = (),
    num_video_frames: int | None = None,
    add_generation_prompt: bool = True,
) -> MediaPrompt:
    """Token ids and media for a plain string (plus `images`/`videos`) or OpenAI-style chat messages.

    Content parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"}},
    {"type": "image", "image" | "path"} (a path, bytes, data: URL or PIL image),
    {"type": "video", "video" | "path"}, {"type": "video_url", "video_url": {"url"}}; a bare string
    or PIL image in a content list is text or an image.
    """
    token_ids_of = ensure_media_tokens(tokenizer)
    messages = _messages(prompt, images, videos)

    # Each message as text with media tokens, and the media sources in order of appearance.
    texts, sources = [], []  # sources: (kind, source, message index)
    for index, (_, parts) in enumerate(messages):
        text = ""
        for kind, value in parts:
            if kind == "text":
                text += _without_media_tokens(value)
            else:
                text += MEDIA_TOKENS[kind]
                sources.append((kind, value, index))
        texts.append(text)

    image_sources = [(value, index) for kind, value, index in sources if kind == "image"]
    images_out = image_media(settings, [value for value, _ in image_sources])
    if image_sources and images_out[0].mode == "dynamic":
        message = image_sources[0][1]
        texts[message] = texts[message].replace(IMAGE_TOKEN, f"{IMAGE_TOKEN}\n" * len(images_out))
    videos_out = [
        video_media(settings, value, i, num_video_frames)
        for i, value in enumerate(value for kind, value, _ in sources if kind == "video")
    ]

    chat = [{"role": role, "content": text.strip()} for (role, _), text in zip(messages, texts)]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    token_ids = tokenizer.encode(text, add_special_tokens=True)

    # Media in placeholder order: each kind keeps its own order, as VILA's per-kind queues do.
    queues = {"image": list(images_out), "video": list(videos_out)}
    kind_of = {token_id: kind for kind, token_id in token_ids_of.items()}
    placeholders = [kind_of[t] for t in token_ids if t in kind_of]
    counts = {kind: placeholders.count(kind) for kind in queues}
    if any(counts[kind] != len(queues[kind]) for kind in queues):
        raise MediaError(
            f"the rendered prompt has {counts['image']} {IMAGE_TOKEN} and {counts['video']} {VIDEO_TOKEN} "
            f"placeholders for {len(images_out)} image tiles and {len(videos_out)} videos; the chat template "
            "or tokenizer lost or split a media token"
        )
    media = [queues[kind].pop(0) for kind in placeholders]
    return MediaPrompt(token_ids=token_ids, media=media, text=text)


def _without_media_tokens(text: str) -> str:
    # VILA removes media tokens typed into text (and then strips that part): only real media make them.
    for token in MEDIA_TOKENS.values():
        if token in text:
            text = text.replace(token, "").strip()
    return text


def _messages(prompt, images, videos) -> list[tuple[str, list[tuple[str, Any]]]]:
    """(role, [(kind, value), ...]) per message, kind in text/image/video."""
    extra = [("image", image) for image in images] + [("video", video) for video in videos]
    if isinstance(prompt, str):
        return [("user", extra + [("text", prompt)])]
    if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt) or not prompt:
        raise MediaError("a prompt is a string or a non-empty list of chat messages ({'role', 'content'} dicts)")
    messages = []
    for message in prompt:
        role = message.get("role")
        if not isinstance(role, str):
            raise MediaError(f"chat message without a string role: {dict(message)!r:.200}")
        messages.append((role, _parts(message.get("content"))))
    if extra:
        first_user = next((i for i, (role, _) in enumerate(messages) if role == "user"), None)
        if first_user is None:
            raise MediaError("images or videos were given separately, but no chat message has the user role")
        messages[first_user] = ("user", extra + messages[first_user][1])
    return messages


def _parts(content) -> list[tuple[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, Sequence):
        raise MediaError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    return [_part(part) for part in content]


def _part(part) -> tuple[str, Any]:
    if isinstance(part, str):
        return ("text", part)
    if isinstance(part, PIL.Image.Image):
        return ("image", part)
    if not isinstance(part, Mapping):
        raise MediaError(f"unsupported content part of type {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise MediaError("a text part needs a string 'text'")
        return ("text", part["text"])
    if kind in ("image", "video"):
        value = part.get(kind, part.get("path", part.get(f"{kind}_pil")))
    elif kind in ("image_url", "video_url"):
        value = part.get(kind)
        value = value.get("url") if isinstance(value, Mapping) else value
        kind = kind.removesuffix("_url")
    else:
        raise MediaError(f"unsupported content part type {kind!r} (text, image, image_url, video, video_url)")
    if value is None:
        raise MediaError(f"the {part.get('type')} part names no {kind}")
    return (kind, value)
