"""A text tokenizer over a Hugging Face model directory's tokenizer files, without transformers.

tokenizer.json (the `tokenizers` library's full pipeline) does the encoding; tokenizer_config.json
names the special tokens; the chat template comes from chat_template.jinja or tokenizer_config.json;
generation_config.json may list further end-of-sequence ids.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import tokenizers

from jvila.processing.chat_template import render_chat_template

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Content that no template produces by itself, to find what follows a message's text.
_SENTINEL = "\ue000jvila-turn-end-probe\ue000"


class Tokenizer:
    """Encode, decode and render chat prompts; knows the BOS, end-of-sequence and padding ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.bos_id = self._id_of("bos_token")
        self.pad_id = self._id_of("pad_token")
        eos = [self._id_of("eos_token"), *extra_eos_ids, self._turn_end_id()]
        # Generation stops on any of these: the model's EOS and the token that closes a chat turn.
        self.eos_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
        files = {name: (path / name).read_text(encoding="utf-8") for name in present}
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: dict[str, str | bytes]) -> Tokenizer:
        """Build from file contents by name, e.g. an `HFCheckpoint.tokenizer_files` dict."""
        if "tokenizer.json" not in files:
            raise ValueError("tokenizer files lack tokenizer.json")
        backend = tokenizers.Tokenizer.from_str(_text(files["tokenizer.json"]))
        config = _json(files, "tokenizer_config.json")
        token_map = _json(files, "special_tokens_map.json")
        special_tokens = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = config.get(key, token_map.get(key))
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            if isinstance(value, str):
                special_tokens[key] = value
        eos = _json(files, "generation_config.json").get("eos_token_id")
        extra_eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=_chat_template(files, config),
            extra_eos_ids=extra_eos,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(..., tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **(self.special_tokens | variables),
        )

    def _id_of(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    def _turn_end_id(self) -> int | None:
        """The special token a chat template writes right after an assistant message, if any."""
        if self.chat_template is None:
            return None
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                add_generation_prompt=False,
            )
        except Exception:  # a template may reject the probe conversation; then there is no answer
            return None
        if _SENTINEL not in text:
            return None
        after = text.split(_SENTINEL, 1)[1].lstrip()
        candidates = [t for t in self.backend.get_added_tokens_decoder().values() if t.special]
        matches = [t.content for t in candidates if t.content and after.startswith(t.content)]
        return self.backend.token_to_id(max(matches, key=len)) if matches else None


def _text(content: str | bytes) -> str:
    return content.decode("utf-8") if isinstance(content, bytes) else content


def _json(files: dict[str, str | bytes], name: str) -> dict[str, Any]:
    return json.loads(_text(files[name])) if name in files else {}


def _chat_template(files: dict[str, str | bytes], config: dict[str, Any]) -> str | None:
    if "chat_template.jinja" in files:
        return _text(files["chat_template.jinja"])
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template
