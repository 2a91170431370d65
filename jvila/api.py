"""The library's front door: `jvila.load(NAME_OR_DIR)` → a `Model` with `generate` and `encode_images`.

Any checkpoint jvila reads loads through the same call: a known model name, a jvila checkpoint, a
GGUF file, a Hugging Face directory or an NVILA directory (the last three are converted once into
the cache). Text models and NVILA share `generate`; only NVILA takes images and videos.

    m = jvila.load("path/to/NVILA-8B")
    m.generate("What is in the picture?", images=["cat.jpg"])          # → ["A cat ..."]
    m.generate(["Describe it.", "And this one?"], images=[["a.jpg"], ["b.jpg", "c.jpg"]])
    m.encode_images(["a.jpg", "b.jpg"])                                 # → [tokens, hidden] per image
    m.load_adapter("sql", "path/to/peft_adapter"); m.generate("...", adapter="sql")   # LoRA (PEFT format)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.peft_adapter import load_peft
from jvila.checkpoints.pretrained import load_pretrained
from jvila.generate import generate as generate_ids
from jvila.models.lora import Adapter, AdapterError, merge
from jvila.models.nvila import NVILA, dynamic_s2_tokens, embed_prompt, image_blocks, tile_tokens, video_block
from jvila.processing.errors import MediaError
from jvila.processing.media_prompt import ImageMedia, MediaSettings, build_media_prompt, image_media
from jvila.processing.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PREPROCESSOR_FILE = "preprocessor_config.json"

# A prompt: a string, or OpenAI-style chat messages ({"role", "content"} dicts).
Prompt = str | Sequence[Mapping[str, Any]]


def load(name_or_path: str, *, dtype: str = "float32") -> Model:
    """Open a checkpoint by known name or path; weights and compute in `dtype` ("float32" or "bfloat16")."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tok_dir = load_pretrained(str(name_or_path), param_dtype=DTYPES[dtype])
    return Model(model, tok_dir)


class Model:
    """A loaded model and its tokenizer (and, for NVILA, its image preprocessing)."""

    def __init__(self, model, tokenizer_dir: str | Path):
        self.model = model
        self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
        self.media_settings = None
        if isinstance(model, NVILA):
            preprocessor = Path(tokenizer_dir) / PREPROCESSOR_FILE
            if not preprocessor.is_file():
                raise CheckpointError(f"NVILA checkpoint lacks {preprocessor} (the image preprocessing settings)")
            self.media_settings = MediaSettings.from_config(model.config, json.loads(preprocessor.read_text()))
        llm = model.llm if isinstance(model, NVILA) else model
        # The decoder the functional core runs, split once.
        self._graphdef, self._state = nnx.split(llm)
        self._llm_config = llm.config
        self._adapters: dict[str, Adapter] = {}

    @property
    def adapters(self) -> dict[str, Adapter]:
        """The loaded LoRA adapters by name (a copy: load and unload through the methods)."""
        return dict(self._adapters)

    def load_adapter(self, name: str, path_or_adapter, *, max_rank: int | None = None) -> Adapter:
        """Load a PEFT LoRA directory (or take an `Adapter`) under `name` for `generate(..., adapter=name)`.

        The adapter is checked against the language model (AdapterError if it does not fit); a name
        already in use is replaced.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("an adapter needs a non-empty name")
        if isinstance(path_or_adapter, Adapter):
            adapter = path_or_adapter.check(self._llm_config)
            if max_rank is not None and adapter.rank > max_rank:
                raise AdapterError(f"adapter {name!r} has rank {adapter.rank}, above the maximum rank {max_rank}")
        else:
            adapter = load_peft(path_or_adapter, self._llm_config, max_rank=max_rank)
        self._adapters[name] = adapter
        return adapter

    def unload_adapter(self, name: str) -> None:
        self._adapter(name)
        del self._adapters[name]

    def _adapter(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._adapters)}")
        return self._adapters[name]

    @property
    def is_multimodal(self) -> bool:
        return isinstance(self.model, NVILA)

    @property
    def decoder(self):
        """(graphdef, state) of the language model the functional core and the serving engine run."""
        return self._graphdef, self._state

    @property
    def config(self):
        """The model's config: an `LLMConfig`, or an `NVILAConfig` for NVILA."""
        return self.model.config

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        images=None,
        videos=None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        system: str | None = None,
        num_frames: int | None = None,
        adapter: str | None = None,
    ) -> list[str]:
        """One completion per prompt (a string prompt counts as a list of one).

        `images`/`videos`: for a single prompt, one source or a list of sources (path, bytes, data:
        URL or PIL image; for videos a file or a folder of frames); for a list of prompts, a list
        with one entry per prompt (None, a source, or a list of sources). `system` is a system
        message put before string prompts. `num_frames` overrides the checkpoint's video frame count.
        Temperature 0 decodes greedily. `adapter` names a loaded LoRA adapter (`load_adapter`) to generate with.
        """
        new_ids = self.generate_token_ids(prompts, images=images, videos=videos, max_tokens=max_tokens,
                                          temperature=temperature, seed=seed, system=system, num_frames=num_frames,
                                          adapter=adapter)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new_ids]

    def generate_token_ids(self, prompts: Prompt | Sequence[Prompt], *, images=None, videos=None,
                           max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                           system: str | None = None, num_frames: int | None = None,
                           adapter: str | None = None) -> list[list[int]]:
        """As `generate`, but the new token ids of each prompt (ending at its first EOS, kept)."""
        # The adapter is merged into a copy of the weights for this call: one adapter for every prompt, no
        # per-step cost; the weights of the loaded model stay as they are.
        state = self._state if adapter is None else merge(self._graphdef, self._state, self._adapter(adapter))
        prompts, images, videos = _per_prompt(prompts, images, videos)
        if not self.is_multimodal and (any(images) or any(videos)):
            raise MediaError("this model is a text model; it takes no images or videos")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        prompts = [_with_system(p, system) for p in prompts]
        if self.is_multimodal:
            spliced = [self._media_prompt(p, i, v, num_frames) for p, i, v in zip(prompts, images, videos)]
            ids = [s[0] for s in spliced]
            embeddings = [s[1] for s in spliced]
            masks = [s[2] for s in spliced]
        else:
            ids = [self._text_prompt(p) for p in prompts]
            embeddings = masks = None
        return generate_ids(self._graphdef, state, ids, max_new_tokens=max_tokens,
                            eos_ids=self.tokenizer.eos_ids, temperature=temperature, seed=seed,
                            input_embeddings=embeddings, embedding_masks=masks)

    def encode_images(self, images) -> list[np.ndarray]:
        """Projected image tokens [tokens, hidden] per image, before the "\\n" end embedding.

        As in a prompt: one image alone goes through the checkpoint's tiling (Dynamic-S2 for NVILA);
        several images are one tile each.
        """
        self._require_media()
        images = _as_list(images)
        if not images:
            raise MediaError("encode_images needs at least one image")
        per_image: dict[int, list[np.ndarray]] = {}
        for item in image_media(self.media_settings, images):
            if item.grid is not None:
                tokens = dynamic_s2_tokens(self.model, item.tiles, item.grid)
            else:
                tokens = tile_tokens(self.model, item.tiles)
            per_image.setdefault(item.image_index, []).append(np.asarray(tokens).reshape(-1, tokens.shape[-1]))
        return [np.concatenate(per_image[i]) for i in range(len(images))]

    def _text_prompt(self, prompt: Prompt) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        for message in messages:
            if not isinstance(message.get("content"), str):
                raise ValueError("a text model's chat messages need string content")
        # The template already writes every special token the model expects.
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def media_prompt(self, prompt: Prompt, *, images=(), videos=(), num_frames: int | None = None):
        """(expanded ids, input embeddings [L, hidden], embedding mask [L]) of one prompt with its media
        spliced in: what the serving engine takes for a request with images or videos.

        Media may also sit in the chat messages themselves as content parts ({"type": "image",
        "image": PIL image, path or data: URL}, ...), as the OpenAI-compatible server passes them.
        """
        self._require_media()
        return self._media_prompt(prompt, list(images), list(videos), num_frames)

    def _media_prompt(self, prompt: Prompt, images, videos, num_frames):
        built = build_media_prompt(self.tokenizer, self.media_settings, prompt, images=images, videos=videos,
                                   num_video_frames=num_frames)
        blocks = []
        for item in built.media:
            if isinstance(item, ImageMedia):
                blocks += image_blocks(self.model, item.tiles, item.grid)
            else:
                blocks.append(video_block(self.model, item.frames))
        ids, embeddings, mask = embed_prompt(self.model, built.token_ids, blocks)
        return [int(t) for t in ids], np.asarray(embeddings), mask

    def _require_media(self):
        if not self.is_multimodal:
            raise MediaError("this model is a text model; it takes no images")


def _as_list(value) -> list:
    """None → [], one source → [source], a list or tuple → itself."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_prompt(prompts, images, videos):
    """Prompts as a list, and one list of images and of videos per prompt."""
    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(m, Mapping) for m in prompts))
    if single:
        return [prompts], [_as_list(images)], [_as_list(videos)]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    per_prompt = []
    for name, media in (("images", images), ("videos", videos)):
        if media is None:
            per_prompt.append([[] for _ in prompts])
            continue
        if not isinstance(media, (list, tuple)) or len(media) != len(prompts):
            raise ValueError(f"with {len(prompts)} prompts, {name} must be a list of {len(prompts)} entries "
                             "(None, a source, or a list of sources per prompt)")
        per_prompt.append([_as_list(m) for m in media])
    return prompts, per_prompt[0], per_prompt[1]


def _with_system(prompt: Prompt, system: str | None) -> Prompt:
    if system is None:
        return prompt
    if not isinstance(prompt, str):
        raise ValueError("system= applies to string prompts; put a system message in the chat messages instead")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
