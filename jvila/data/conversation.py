"""One conversation -> token ids and the loss mask that learns only the assistant's replies.

(A plain-text record learns all of its tokens, an end-of-sequence token appended.)

The mask follows NVlabs/VILA (llava/utils/tokenizer.py, `preprocess_conversation`): render the
conversation with the tokenizer's chat template; render it again with every assistant reply
replaced by a sentinel token; drop each sentinel and the token right after it (the end-of-turn
token) from that second rendering; then walk both token lists together — every token of the real
conversation that the sentinel rendering does not account for is learned. So a reply's tokens and
its end-of-turn token are learned, and the system prompt, user turns, role headers and the newline
after the end-of-turn token are not (VILA's IGNORE_INDEX).

Each `<image>` placeholder becomes K image-token ids (K = the rows of one image block, end tokens
included), each `<vila/video>` placeholder Kv video-token ids (the rows of one pooled video block),
none of them learned.
"""

from __future__ import annotations

import jinja2
import numpy as np
import tokenizers

from jvila.data.records import IMAGE_PLACEHOLDER, Record, RecordError, Turn
from jvila.processing.tokenizer import Tokenizer

SENTINEL_TOKEN = "<vila/sentinel>"


def ensure_sentinel_token(tokenizer: Tokenizer) -> int:
    """The sentinel's id, added to the tokenizer as a special token if missing (VILA does the same)."""
    token_id = tokenizer.token_to_id(SENTINEL_TOKEN)
    if token_id is None:
        tokenizer.backend.add_special_tokens([tokenizers.AddedToken(SENTINEL_TOKEN, special=True, normalized=False)])
        token_id = tokenizer.token_to_id(SENTINEL_TOKEN)
    return token_id


def assistant_mask(tokenizer: Tokenizer, messages: list[dict[str, str]], record_id=None) -> tuple[list[int], list[int]]:
    """(token ids, mask) of the rendered conversation; mask 1 on assistant reply tokens and their end token."""
    sentinel = tokenizer.token_to_id(SENTINEL_TOKEN)
    if sentinel is None:
        raise ValueError(f"the tokenizer lacks {SENTINEL_TOKEN}; call ensure_sentinel_token(tokenizer) first")
    probe = [m | {"content": SENTINEL_TOKEN} if m["role"] == "assistant" else m for m in messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        probe_text = tokenizer.apply_chat_template(probe, add_generation_prompt=False)
    except jinja2.TemplateError as e:  # e.g. a template's raise_exception on roles out of order
        raise RecordError(record_id, f"the chat template rejects the conversation: {e}") from None
    ids = tokenizer.encode(text, add_special_tokens=True)
    template = tokenizer.encode(probe_text, add_special_tokens=True)
    # As VILA: if the first alignment fails, retry dropping the token before each sentinel as well
    # (some tokenizers put an empty piece there that the reply's own first token absorbs).
    for drop_before in (False, True):
        mask = _align(ids, _without_sentinels(template, sentinel, drop_before))
        if mask is not None:
            break
    else:
        raise RecordError(record_id, "the chat template's rendering could not be aligned with the sentinel probe")
    if not any(mask):
        raise RecordError(record_id, "the assistant turns hold no tokens to learn")
    return ids, mask


def _without_sentinels(template: list[int], sentinel: int, drop_before: bool) -> list[int]:
    keep = np.ones(len(template), bool)
    for k, token in enumerate(template):
        if token == sentinel:
            keep[k:k + 2] = False  # the sentinel and the end-of-turn token the reply's learning includes
            if drop_before and k > 0:
                keep[k - 1] = False
    return [t for t, kept in zip(template, keep) if kept]


def _align(ids: list[int], template: list[int]) -> list[int] | None:
    """Walk both lists: tokens the template accounts for are not learned, the rest are; None when the
    template is not a subsequence of the conversation."""
    mask, p = [], 0
    for token in ids:
        if p < len(template) and token == template[p]:
            p += 1
            mask.append(0)
        else:
            mask.append(1)
    return mask if p == len(template) else None


def tokenize_record(tokenizer: Tokenizer, record: Record, *, image_token_id: int | None = None,
                    image_tokens: int = 1, images_per_placeholder: list[int] | None = None,
                    video_token_id: int | None = None, video_tokens: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], loss_mask int32 [n]) for one record, each image placeholder expanded to
    `image_tokens` copies of `image_token_id` (times `images_per_placeholder[i]` for the i-th
    placeholder when one image is several tiles, each its own block), each video placeholder to
    `video_tokens` copies of `video_token_id` (one video block)."""
    turns = record.turns if record.text is None else (Turn("user", record.text),)
    if images_per_placeholder is not None:
        turns = _expand_placeholders(turns, images_per_placeholder)
    if record.text is not None:
        ids = tokenizer.encode(turns[0].text, add_special_tokens=True)
        # Plain text: every token is learned, and the end of the document too (the model learns to stop).
        ids = np.asarray(ids + tokenizer.eos_ids[:1], np.int32)
        mask = np.ones(len(ids), np.int32)
        if image_token_id is not None:
            mask[ids == image_token_id] = 0
        if video_token_id is not None:
            mask[ids == video_token_id] = 0
    else:
        # VILA strips every message before rendering it.
        messages = [{"role": turn.role, "content": turn.text.strip()} for turn in turns]
        ids, mask = assistant_mask(tokenizer, messages, record.id)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    expected = sum(images_per_placeholder) if images_per_placeholder is not None else len(record.images)
    if image_token_id is None:
        if expected:
            raise RecordError(record.id, "has images but the model takes text only")
        return _widen_videos(ids, mask, record, video_token_id, video_tokens)
    where = ids == image_token_id
    if int(where.sum()) != expected:
        raise RecordError(record.id, f"the rendered prompt has {int(where.sum())} image tokens for {expected} "
                          "images; the chat template or tokenizer lost or split a placeholder")
    if np.any(mask[where]):
        raise RecordError(record.id, "an image placeholder lies inside an assistant reply; images belong to "
                          "user turns")
    repeats = np.where(where, image_tokens, 1)
    return _widen_videos(np.repeat(ids, repeats), np.repeat(mask, repeats), record, video_token_id, video_tokens)


def _widen_videos(ids: np.ndarray, mask: np.ndarray, record: Record, video_token_id: int | None,
                  video_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Each video placeholder id → `video_tokens` copies (the rows of its block), none learned."""
    if video_token_id is None:
        if record.videos:
            raise RecordError(record.id, "has videos but the model takes no video")
        return ids, mask
    where = ids == video_token_id
    if int(where.sum()) != len(record.videos):
        raise RecordError(record.id, f"the rendered prompt has {int(where.sum())} video tokens for "
                          f"{len(record.videos)} videos; the chat template or tokenizer lost or split a placeholder")
    if np.any(mask[where]):
        raise RecordError(record.id, "a video placeholder lies inside an assistant reply; videos belong to user turns")
    repeats = np.where(where, video_tokens, 1)
    return np.repeat(ids, repeats), np.repeat(mask, repeats)


def _expand_placeholders(turns, counts: list[int]):
    out, i = [], 0
    for turn in turns:
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            # NVILA-Lite's dynamic tiling: one placeholder (and a newline) per tile, as at inference.
            text += f"{IMAGE_PLACEHOLDER}\n" * counts[i] + piece if counts[i] > 1 else IMAGE_PLACEHOLDER + piece
            i += 1
        out.append(Turn(turn.role, text))
    return tuple(out)
