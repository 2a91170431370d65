"""One request's life inside the engine: its tokens, how many of them the cache holds, and when it ends.

A sequence's `tokens` are its prompt followed by everything sampled so far. The first
`num_computed` of them have their K/V in the page pool; the rest are fed to the model in the next
steps (a prompt chunk by chunk, then one token per decode step). When a step feeds a sequence's
last pending token, the logits there give its next token. Preemption by recompute only resets
`num_computed`: the tokens stay, so the sequence resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from serving.request import FinishReason, Request, TokenLogprob


@dataclasses.dataclass
class Sequence:
    request: Request
    seed: int  # the request's own seed, or one the engine drew for it
    tokens: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache (the whole prompt before prefill, 1 while decoding)."""
        return len(self.tokens) - self.num_computed

    @property
    def cacheable_len(self) -> int:
        """Leading tokens whose K/V depend on token ids alone, so their pages may be shared.

        Media rows carry embeddings the ids do not describe: two requests with the same
        placeholder ids but different images must not share pages from the first media row on.
        """
        mask = self.request.embedding_mask
        if mask is None or not np.any(mask):
            return len(self.tokens)
        return int(np.argmax(np.asarray(mask)))

    def media_rows(self, start: int, stop: int):
        """Embeddings and mask for positions [start, stop), or None when that span has no media."""
        mask = self.request.embedding_mask
        if mask is None:
            return None
        stop_in_prompt = min(stop, self.num_prompt)
        span = np.zeros((stop - start,), bool)
        if start < stop_in_prompt:
            span[: stop_in_prompt - start] = np.asarray(mask[start:stop_in_prompt], bool)
        if not span.any():
            return None
        rows = np.zeros((stop - start, self.request.input_embeddings.shape[-1]), np.float32)
        if start < stop_in_prompt:
            rows[: stop_in_prompt - start] = np.asarray(self.request.input_embeddings[start:stop_in_prompt], np.float32)
        return rows, span


def finish_reason(seq: Sequence, *, eos_ids: frozenset[int], max_context: int,
                  detokenize: Callable[[list[int]], str] | None) -> tuple[FinishReason | None, str | None]:
    """Whether `seq` ends with the token it just received, and, for a stop string, its output text cut there.

    End-of-sequence and stop token ids are kept in the output (as `generate` always has); a stop
    string ends the text before its first match.
    """
    params = seq.request.params
    token = seq.tokens[-1]
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        return FinishReason.STOP, None
    if params.stop and detokenize is not None:
        text = detokenize(seq.output_ids)
        hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if hits:
            return FinishReason.STOP, text[: min(hits)]
    if seq.num_output >= params.max_tokens or len(seq.tokens) >= max_context:
        return FinishReason.LENGTH, None
    return None, None
