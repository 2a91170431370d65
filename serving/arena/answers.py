"""A battle's two answers, generated at once through the server's chat-completions path and merged into one stream.

Each side is a streamed chat completion exactly as POST /v1/chat/completions serves it (same prompt
building, sampling and scheduler). Its OpenAI chunks are read back and re-sent as Arena events that
carry only the side and the text, so nothing in the stream names the model before the vote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

# What a finished side hands back: (side, full text, completion tokens or None, finish reason).
SideDone = Callable[[str, str, int | None, str | None], Awaitable[None]]


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def side_events(side: str, chunks: AsyncIterator[str]) -> AsyncIterator[dict]:
    """Arena events from one side's OpenAI SSE chunks: {"side", "text"} per piece, then one {"side", "done"}.

    The last event carries the whole text, the completion token count (from the usage chunk) and the
    finish reason; an error chunk (the engine stopped) becomes {"side", "error"} and ends the side.
    """
    text, tokens, finish = [], None, None
    async for chunk in chunks:
        for line in chunk.splitlines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                yield {"side": side, "done": True, "answer": "".join(text), "tokens": tokens, "finish_reason": finish}
                return
            payload = json.loads(data)
            if "error" in payload:
                yield {"side": side, "error": payload["error"]["message"]}
                return
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            for choice in payload["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    text.append(piece)
                    yield {"side": side, "text": piece}
                finish = choice.get("finish_reason") or finish
    yield {"side": side, "error": "the answer ended before it was complete"}


async def merged_battle_stream(sides: dict[str, AsyncIterator[str]], on_done: SideDone) -> AsyncIterator[str]:
    """Both sides' events as they come (SSE text), then {"done": true}; `on_done` stores each finished answer.

    If the reader goes away, both generations are closed, which aborts their engine requests.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(side: str, chunks: AsyncIterator[str]) -> None:
        try:
            async for item in side_events(side, chunks):
                if item.get("done"):
                    await on_done(side, item.pop("answer"), item.pop("tokens"), item["finish_reason"])
                await queue.put(item)
        except Exception as e:  # noqa: BLE001 - reported to the reader as this side's error, the other side goes on
            await queue.put({"side": side, "error": f"internal error: {e!r}"})
        finally:
            await queue.put(None)
            # Closing the server's generator runs its clean-up: an unfinished request is aborted in the engine.
            with contextlib.suppress(Exception):
                await chunks.aclose()

    tasks = [asyncio.create_task(pump(side, chunks)) for side, chunks in sides.items()]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield event(item)
        yield event({"done": True})
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
