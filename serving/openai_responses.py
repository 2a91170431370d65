"""Engine outputs → OpenAI response bodies: choices, text deltas, logprobs, usage, stream chunks.

One engine request serves one choice (n > 1 and several prompts are several requests; identical
prompts share their KV pages through the allocator's prefix cache). Text is produced
incrementally with stop strings cut (serving.text_stream); when a stop string shows up here
before the engine has ended the request, the request is aborted so its pages are freed at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from serving.request import FinishReason, RequestOutput, TokenLogprob
from serving.text_stream import IncrementalText


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Choice:
    """One choice being generated: its stream, its text so far and how it ended."""

    def __init__(self, index: int, stream, tokenizer, *, stop: tuple[str, ...], prompt_index: int = 0):
        self.index = index
        self.prompt_index = prompt_index
        self.stream = stream
        self._tokenizer = tokenizer
        self.text = IncrementalText(self.decode, stop)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> tuple[str, list[TokenLogprob]]:
        """Take one engine output; return (text to send, logprobs of its tokens)."""
        if self.done:
            return "", []
        self.token_ids += out.new_token_ids
        new_logprobs = list(out.new_logprobs or [])
        self.logprobs += new_logprobs
        delta = self.text.add(out.new_token_ids)
        if out.finish_reason is not None:
            delta += self.text.finish()
            self.finish_reason = "stop" if self.text.stopped else _finish_name(out.finish_reason)
        elif self.text.stopped:
            self.stream.abort()  # the stop string is here: free the pages now rather than after more tokens
            self.finish_reason = "stop"
        return delta, new_logprobs


def _finish_name(reason: FinishReason) -> str:
    return reason.value


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Outputs of all choices as they come; every unfinished request is aborted when this ends early."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice):
        try:
            async for out in choice.stream:
                queue.put_nowait((choice, out, None))
        except Exception as e:  # noqa: BLE001 — handed to the consumer below
            queue.put_nowait((choice, None, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        while not all(c.done for c in choices):
            choice, out, error = await queue.get()
            if error is not None:
                raise error
            yield choice, out
    finally:
        for choice in choices:
            choice.stream.abort()  # no-op for finished requests; frees the rest (client gone, error)
        for task in tasks:
            task.cancel()


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], *, decode, token_ids: list[int],
                        first: int, text_offset: int) -> dict[str, Any]:
    """The legacy completions shape; `first` is the index of entries[0] among token_ids (for text offsets)."""
    offsets = [text_offset + len(decode(token_ids[:first + i])) for i in range(len(entries))]
    return {
        "tokens": [token_text(tokenizer, e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
