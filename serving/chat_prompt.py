"""Chat messages and completion prompts → the token ids (and media embeddings) the engine takes.

Text conversations go through the checkpoint's chat template. Messages with images have each
`data:` URL decoded first (a bad one is the client's error whatever the model), then go to the
media prompt builder if the model has one (the NVILA path: it renders the prompt with the media
placeholders and returns the embeddings to splice in); a text-only model refuses them clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2
import numpy as np

from serving.image_urls import ImageURLError, decode_image_url
from serving.openai_protocol import APIError, ChatMessage

# (messages with content parts {"type": "text", "text"} / {"type": "image", "image": PIL.Image})
#   → (prompt ids, input_embeddings [L, hidden] or None, embedding_mask [L] or None)
MediaPromptBuilder = Callable[[list[dict[str, Any]]], tuple[list[int], np.ndarray | None, np.ndarray | None]]


def chat_prompt(tokenizer, messages: list[ChatMessage], *, model_name: str,
                media_prompt: MediaPromptBuilder | None = None):
    """(prompt ids, input_embeddings, embedding_mask) for a chat request; APIError(400) on bad content."""
    converted, has_images = [], False
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None or isinstance(content, str):
            converted.append({"role": role, "content": content or ""})
            continue
        parts = []
        for j, part in enumerate(content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            try:
                parts.append({"type": "image", "image": decode_image_url(part.image_url.url)})
            except ImageURLError as e:
                raise APIError(400, f"messages[{i}].content[{j}]: {e}", param=f"messages.{i}.content.{j}.image_url",
                               code="invalid_image") from None
            has_images = True
        converted.append({"role": role, "content": parts})
    if has_images:
        if media_prompt is None:
            raise APIError(400, f"model {model_name!r} is text-only: it cannot take images", param="messages",
                           code="model_is_text_only")
        try:
            ids, embeddings, mask = media_prompt(converted)
        except ValueError as e:  # the builder's own refusals (too many images, a video too short, ...)
            raise APIError(400, str(e), param="messages") from None
        return list(ids), embeddings, mask
    # Text parts of one message read as one text, as OpenAI's models see them.
    text_messages = [m if isinstance(m["content"], str) else
                     m | {"content": "\n".join(p["text"] for p in m["content"])} for m in converted]
    try:
        text = tokenizer.apply_chat_template(text_messages, add_generation_prompt=True)
    except (jinja2.TemplateError, ValueError) as e:  # e.g. a template that demands alternating roles
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
    # The template already writes every special token the model expects.
    return tokenizer.encode(text, add_special_tokens=False), None, None


def completion_prompt(tokenizer, prompt: str | list[int], *, vocab_size: int, index: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                           param="prompt")
    if not ids:
        raise APIError(400, f"prompt {index} is empty", param="prompt")
    return ids
