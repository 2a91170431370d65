"""The Arena's HTTP routes, mounted on the OpenAI-compatible app (`jvila serve --arena`).

Pages: GET /arena (battle), GET /arena/leaderboard, static files under /arena/static/.
API (JSON; errors in the server's OpenAI error shape):
  POST /arena/api/battles {"prompt"}            → 201 {"battle_id", ...}: two anonymous contestants drawn
  POST /arena/api/battles/{id}/answers          → SSE: {"side": "a"|"b", "text"} ..., {"side", "done"}, {"done"}
  POST /arena/api/battles/{id}/vote {"winner"}  → {"winner", "model_a", "model_b"}: the names, after the vote
  GET  /arena/api/battles/{id}                  → the battle (names only once voted)
  GET  /arena/api/leaderboard?method=bt|elo&style_control=false → ratings with 95% intervals from the votes
  GET  /arena/leaderboard.png?(same)            → the ratings chart
  GET  /arena/battles.jsonl                     → every voted battle, as `jvila eval arena` reads them
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from pathlib import Path

import fastapi
import pydantic
from fastapi.responses import (
    FileResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles

from serving.api_keys import Client
from serving.api_server import chat_completion, served_model_names
from serving.arena.answers import merged_battle_stream
from serving.arena.contestants import Contestant, contestants_for, draw_pair
from serving.arena.export import battle_record
from serving.arena.ratings import Ratings, check_view
from serving.arena.store import ArenaError, ArenaStore, StoredBattle
from serving.chat_prompt import chat_prompt
from serving.openai_protocol import APIError, ChatCompletionRequest, ChatMessage

log = logging.getLogger("jvila.serving")

STATIC_DIR = Path(__file__).parent / "static"
# The scheduler sees every Arena answer as coming from one client.
ARENA_CLIENT = Client("arena")


@dataclasses.dataclass(frozen=True)
class ArenaOptions:
    database: str  # an SQLAlchemy URL, or a path for a SQLite file
    contestants_file: str | None = None  # None: every served model is a contestant
    max_prompt_chars: int = 8000
    max_tokens: int = 512  # most tokens in one answer (less when the context leaves less)
    bootstrap_rounds: int = 100  # of the leaderboard's intervals
    seed: int | None = None  # of the pair draws; None: a fresh one


class _Prompt(pydantic.BaseModel):
    prompt: str


class _Vote(pydantic.BaseModel):
    winner: str


@dataclasses.dataclass
class Arena:
    """The Arena's state on a running app (app.state.arena)."""

    store: ArenaStore
    ratings: Ratings
    server: object  # the app's ServerState
    options: ArenaOptions
    rng: random.Random
    fixed_contestants: dict[str, Contestant] | None  # from the contestants file; None: the served models

    def contestants(self) -> dict[str, Contestant]:
        """The contestants now: the file's, or every model served at this moment (adapters come and go)."""
        if self.fixed_contestants is not None:
            return self.fixed_contestants
        try:
            return {c.name: c for c in contestants_for(served_model_names(self.server))}
        except ValueError as e:
            raise APIError(503, str(e), type="server_error", code="too_few_contestants") from None


def mount_arena(app: fastapi.FastAPI, options: ArenaOptions) -> Arena:
    """Add the Arena to an app made by create_app; ValueError (before serving anything) on a bad setup."""
    server = app.state.server
    contestants = contestants_for(served_model_names(server), options.contestants_file)
    if options.max_prompt_chars < 1 or options.max_tokens < 1 or options.bootstrap_rounds < 0:
        raise ValueError("the Arena's prompt and answer limits must be at least 1, its bootstrap rounds at least 0")
    store = ArenaStore(options.database)
    fixed = {c.name: c for c in contestants} if options.contestants_file else None
    arena = Arena(store, Ratings(store, bootstrap_rounds=options.bootstrap_rounds), server, options,
                  random.Random(options.seed), fixed)
    app.state.arena = arena
    app.include_router(_router(arena, server))
    app.mount("/arena/static", StaticFiles(directory=STATIC_DIR), name="arena-static")
    battles, votes = store.count()
    log.info("arena: %d contestants (%s), %d battles and %d votes in %s", len(contestants),
             ", ".join(c.name for c in contestants), battles, votes, options.database)
    return arena


def _router(arena: Arena, server) -> fastapi.APIRouter:
    router = fastapi.APIRouter()
    options = arena.options

    @router.get("/arena", include_in_schema=False)
    async def battle_page():
        return FileResponse(STATIC_DIR / "arena.html")

    @router.get("/arena/leaderboard", include_in_schema=False)
    async def leaderboard_page():
        return FileResponse(STATIC_DIR / "leaderboard.html")

    @router.get("/arena/api/info")
    def info():
        battles, votes = arena.store.count()
        return {"contestants": sorted(arena.contestants()), "battles": battles, "votes": votes,
                "max_prompt_chars": options.max_prompt_chars}

    @router.post("/arena/api/battles", status_code=201)
    def new_battle(body: _Prompt):
        prompt = body.prompt.strip()
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) > options.max_prompt_chars:
            raise APIError(413, f"the prompt has {len(prompt)} characters; the Arena takes at most "
                                f"{options.max_prompt_chars}", param="prompt", code="prompt_too_long")
        a, b = draw_pair(list(arena.contestants().values()), arena.rng)
        for side in (a, b):  # refused now, before a battle is stored, if either side has no room to answer
            _answer_limit(server, side, prompt, options.max_tokens)
        battle = arena.store.create_battle(prompt, a.name, b.name)
        return {"battle_id": battle.id, "prompt": prompt}

    @router.get("/arena/api/battles/{battle_id}")
    def get_battle(battle_id: str):
        return _public(_get(arena, battle_id))

    @router.post("/arena/api/battles/{battle_id}/answers")
    async def answers(battle_id: str, request: fastapi.Request):
        battle = await asyncio.to_thread(_call, arena.store.start, battle_id)
        sides = {}
        try:
            contestants = arena.contestants()
            for side, name in (("a", battle.contestant_a), ("b", battle.contestant_b)):
                contestant = contestants.get(name)
                if contestant is None:
                    raise APIError(409, f"battle {battle_id!r} names the contestant {name!r}, which is no longer in "
                                        "the Arena")
                body = _completion_request(contestant, battle.prompt,
                                           _answer_limit(server, contestant, battle.prompt, options.max_tokens))
                response = await chat_completion(server, body, request, ARENA_CLIENT)
                sides[side] = response.body_iterator
        except BaseException:
            for chunks in sides.values():
                await chunks.aclose()  # aborts what was already submitted
            await asyncio.to_thread(arena.store.release, battle_id)
            raise

        async def on_done(side: str, text: str, tokens: int | None, finish_reason: str | None) -> None:
            await asyncio.to_thread(arena.store.save_answer, battle_id, side, text, tokens)

        return StreamingResponse(merged_battle_stream(sides, on_done), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/arena/api/battles/{battle_id}/vote")
    def vote(battle_id: str, body: _Vote):
        battle = _call(arena.store.vote, battle_id, body.winner)
        log.info("arena: battle %s voted %s", battle_id, body.winner)
        return _public(battle)

    @router.get("/arena/api/leaderboard")
    async def leaderboard(method: str = "bt", style_control: bool = False):
        _view(method, style_control)
        board = await asyncio.to_thread(arena.ratings.board, method, style_control)
        try:
            names = sorted(arena.contestants())
        except APIError:  # fewer than two models served right now: the votes are still rated
            names = []
        return board | {"contestants": names}

    @router.get("/arena/leaderboard.png", include_in_schema=False)
    async def leaderboard_chart(method: str = "bt", style_control: bool = False):
        _view(method, style_control)
        png = await asyncio.to_thread(arena.ratings.chart, method, style_control)
        if png is None:
            raise APIError(404, "no votes yet (or no finite rating): there is no chart")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @router.get("/arena/battles.jsonl", include_in_schema=False)
    def export():
        lines = [json.dumps(battle_record(b), ensure_ascii=False) for b in arena.store.voted_battles()]
        return PlainTextResponse("".join(line + "\n" for line in lines), media_type="application/x-ndjson")

    return router


def _view(method: str, style_control: bool) -> None:
    try:
        check_view(method, style_control)
    except ValueError as e:
        raise APIError(400, str(e), param="method") from None


def _call(method, *args):
    try:
        return method(*args)
    except ArenaError as e:
        raise APIError(e.status, str(e)) from None


def _get(arena: Arena, battle_id: str) -> StoredBattle:
    return _call(arena.store.get, battle_id)


def _public(battle: StoredBattle) -> dict:
    """A battle as the page may see it: the contestants' names only once it has been voted on."""
    voted = battle.winner is not None
    return {"battle_id": battle.id, "prompt": battle.prompt, "answer_a": battle.answer_a, "answer_b": battle.answer_b,
            "winner": battle.winner, "model_a": battle.contestant_a if voted else None,
            "model_b": battle.contestant_b if voted else None}


def _messages(contestant: Contestant, prompt: str) -> list[ChatMessage]:
    system = [ChatMessage(role="system", content=contestant.system)] if contestant.system else []
    return system + [ChatMessage(role="user", content=prompt)]


def _answer_limit(server, contestant: Contestant, prompt: str, max_tokens: int) -> int:
    """Tokens this side may answer with: the Arena's limit, or what the context leaves after the prompt."""
    ids, _, _ = chat_prompt(server.tokenizer, _messages(contestant, prompt), model_name=contestant.model)
    room = server.max_context - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt is too long: with the chat template it takes {len(ids)} tokens of the "
                            f"model's {server.max_context}, leaving no room for an answer", param="prompt",
                       code="context_length_exceeded")
    return min(max_tokens, room)


def _completion_request(contestant: Contestant, prompt: str, max_tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=contestant.model, messages=_messages(contestant, prompt),
                                 temperature=contestant.temperature, max_tokens=max_tokens, stream=True,
                                 stream_options={"include_usage": True})

