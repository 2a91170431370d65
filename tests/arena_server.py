"""The Arena mounted on a live server for tests: the real engine on the tiny random Llama of live_server.py."""

from __future__ import annotations

import contextlib
import json

from live_server import CONTEXT, MODEL_NAME, NUM_PAGES
from serving.api_server import ServerThread, create_app
from serving.arena import ArenaOptions, mount_arena
from serving.async_engine import AsyncEngine
from serving.launch import EngineOptions, build_engine, make_scheduler_for

MAX_TOKENS = 6
# Two contestants over the one served model, told apart by their system prompts.
SYSTEMS = {"alpha": "You are a helpful assistant.", "beta": None}


@contextlib.contextmanager
def arena_server(tokenizer, graphdef, state, database: str, contestants_file: str | None, *, adapters=None,
                 **arena_options):
    """The real engine (with an AdapterStore: LoRA adapters served too), the OpenAI app and the Arena on
    127.0.0.1 (a free port); stopped on exit."""
    options = EngineOptions(num_pages=NUM_PAGES, page_size=16, max_running=4, token_budget=8, max_context=CONTEXT)
    engine = build_engine(graphdef, state, tokenizer, scheduler=make_scheduler_for("fcfs"), options=options,
                          adapters=adapters)
    app = create_app(AsyncEngine(engine), tokenizer, model_name=MODEL_NAME, max_context=engine.max_context,
                     vocab_size=engine.vocab_size)
    arena = mount_arena(app, ArenaOptions(database=database, contestants_file=contestants_file,
                                          **({"max_tokens": MAX_TOKENS, "bootstrap_rounds": 20} | arena_options)))
    server = ServerThread(app).start()
    try:
        yield server, arena, engine
    finally:
        server.stop()
        arena.store.close()


def write_contestants(path) -> str:
    entries = [{"name": name, "model": MODEL_NAME, "temperature": 0} | ({"system": system} if system else {})
               for name, system in SYSTEMS.items()]
    path.write_text(json.dumps(entries))
    return str(path)
