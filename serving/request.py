"""What a client asks of the engine and what comes back, shared by the engine, the schedulers
and the HTTP server.

A request is token ids (already templated and tokenized) plus, optionally, input embeddings for
media: `input_embeddings[i]` replaces the token embedding at prompt position i wherever
`embedding_mask[i]` is set (the NVILA path splices image and video blocks in this way; the
engine never looks at pixels).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first match
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own end-of-sequence ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; N = the sampled token's logprob and the top N

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must lie in [0, 2], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must lie in [0, 20], got {self.logprobs}")


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    client: str = "default"  # who is served: fairness is per client
    arrival_time: float = 0.0
    # Media: [len(prompt_ids), hidden] float array and a [len(prompt_ids)] bool mask, or None.
    input_embeddings: np.ndarray | None = None
    embedding_mask: np.ndarray | None = None
    adapter: str | None = None  # a loaded LoRA adapter's name; None = the base model

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if (self.input_embeddings is None) != (self.embedding_mask is None):
            raise ValueError("input_embeddings and embedding_mask come together")
        if self.input_embeddings is not None and (
            len(self.input_embeddings) != len(self.prompt_ids) or len(self.embedding_mask) != len(self.prompt_ids)
        ):
            raise ValueError("input_embeddings and embedding_mask need one row per prompt token")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence id, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context
    ABORT = "abort"  # the client went away or the request was cancelled


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclasses.dataclass
class RequestOutput:
    """What one engine step produced for one request: its new tokens (usually one)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None  # set on the request's last output
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, including these
    # Set only on the last output of a request ended by a stop string: its whole output text (all
    # its tokens detokenized together), cut before the first match. The tokens are not cut.
    text: str | None = None
