"""Assemble a servable app from a model name or directory: model, tokenizer, scheduler, engine, HTTP app.

`jvila serve` and the serving benchmark build their servers here, so they serve the same thing.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from flax import nnx

from serving.api_keys import ApiKeys
from serving.api_server import create_app
from serving.async_engine import AsyncEngine
from serving.engine import Engine
from serving.scheduler import make_scheduler

log = logging.getLogger("jvila")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    num_pages: int = 1024
    page_size: int = 16
    max_running: int = 32
    token_budget: int = 256
    max_context: int | None = None  # default: the model's, as far as the pool holds it
    cache_dtype: object = None


def make_scheduler_for(name: str, *, api_keys: ApiKeys | None = None, rpm_limit: int | None = None):
    """The named policy; VTC is weighted by the API keys' client weights, RPM needs its limit."""
    weights = api_keys.weights if api_keys is not None and name.startswith("vtc") else None
    return make_scheduler(name, weights=weights, rpm_limit=rpm_limit if name == "rpm" else None)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """Multi-LoRA serving: adapters to preload (name -> PEFT dir), the largest rank, the root of runtime loads."""

    adapters: tuple[tuple[str, str], ...] = ()
    max_rank: int = 64
    root: str | None = None  # POST /v1/load_lora_adapter reads only under it; None = runtime loading off
    dtype: str | None = None  # the dtype steps read adapters in; None = the KV pools'


def build_adapter_store(config, lora: LoraOptions):
    """The adapter store with every preloaded adapter read and checked (AdapterError names the bad one)."""
    from serving.adapters.store import AdapterError, AdapterStore, read_peft

    store = AdapterStore(config, max_rank=lora.max_rank, root=lora.root, reader=read_peft)
    for name, path in lora.adapters:
        try:
            store.add(name, store.read(path, check_root=False))  # the operator's own paths: no root needed
        except AdapterError as e:
            raise AdapterError(f"--lora {name}={path}: {e}") from None
    return store


def build_engine(graphdef, state, tokenizer, *, scheduler, options: EngineOptions = EngineOptions(),
                 attention=None, adapters=None, lora_dtype=None) -> Engine:
    return Engine(graphdef, state, eos_ids=tokenizer.eos_ids, num_pages=options.num_pages,
                  page_size=options.page_size, max_running=options.max_running, token_budget=options.token_budget,
                  max_context=options.max_context, scheduler=scheduler, attention=attention,
                  cache_dtype=options.cache_dtype,
                  detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), adapters=adapters,
                  lora_dtype=lora_dtype)


def build_app(model_name_or_dir: str, *, served_name: str | None = None, dtype: str = "float32",
              scheduler: str = "vtc", rpm_limit: int | None = None, api_keys: ApiKeys | None = None,
              options: EngineOptions = EngineOptions(), arena=None, lora: LoraOptions | None = None):
    """(app, engine) for a known model name, a jvila checkpoint, a GGUF file, an HF or an NVILA directory.

    `arena` (serving.arena.ArenaOptions) adds the Arena's pages and routes on the same engine.
    With `lora`, requests may name LoRA adapters (preloaded, or loaded at run time under its root).
    """
    import jvila

    start = time.perf_counter()
    model = jvila.load(model_name_or_dir, dtype=dtype)
    tokenizer = model.tokenizer
    graphdef, state = model.decoder
    policy = make_scheduler_for(scheduler, api_keys=api_keys, rpm_limit=rpm_limit)
    adapters = None
    if lora is not None:
        # The decoder's config (NVILA's language model too): adapters apply to the LLM.
        adapters = build_adapter_store(nnx.merge(graphdef, state).config, lora)
        log.info("LoRA: %d adapter(s) preloaded, max rank %d, runtime loading %s", len(adapters), lora.max_rank,
                 f"under {lora.root}" if lora.root else "off (no --lora-root)")
    engine = build_engine(graphdef, state, tokenizer, scheduler=policy, options=options, adapters=adapters,
                          lora_dtype=None if lora is None else lora.dtype)
    log.info("loaded %s in %.1fs: context %d tokens, %d pages of %d, scheduler %s", model_name_or_dir,
             time.perf_counter() - start, engine.max_context, options.num_pages, options.page_size, scheduler)
    # The media seam: NVILA splices images into the prompt as input embeddings; a text-only
    # checkpoint has no media prompt builder, so images get a clear 400.
    media_prompt = model.media_prompt if model.is_multimodal else None
    app = create_app(AsyncEngine(engine), tokenizer, model_name=served_name or model_name_or_dir,
                     max_context=engine.max_context, vocab_size=engine.vocab_size, api_keys=api_keys,
                     media_prompt=media_prompt)
    if arena is not None:
        from serving.arena import mount_arena

        mount_arena(app, arena)
    return app, engine
