"""The engine's proof: whatever else shares its steps, a greedy request gets the tokens it gets alone.

The reference runs each request by itself through the functional core's padded `extend` and
`decode_step` on a contiguous cache: a different code path from the engine's packed steps over
a shared, paged, preempting pool. Float32 throughout, so the two agree to rounding and greedy
tokens agree exactly (the tiny model's top two logits are far apart next to float32 rounding).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.llm import LLM
from serving.engine import Engine
from serving.request import FinishReason, Request, SamplingParams

CFG = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=512)
REF_WIDTH = 128  # the reference pads every prompt to this width: one compilation
# Both tests share the pool's shape and the token budget, and so the engine step's compilations.
POOL = {"num_pages": 20, "page_size": 8, "token_budget": 32, "attention": dense_attention}


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(11)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ref_prefill(graphdef, state, tokens, length, embeddings, mask):
    model = nnx.merge(graphdef, state)
    x = jnp.where(mask[..., None], embeddings, model.embed_tokens(tokens))
    cache = contiguous_cache(CFG, 1, REF_WIDTH + 64, page_size=16)
    return functional.extend(graphdef, state, tokens, length, cache, attention=dense_attention, input_embeddings=x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ref_decode(graphdef, state, token, cache):
    return functional.decode_step(graphdef, state, token, cache, attention=dense_attention)


def reference_greedy(graphdef, state, prompt, max_tokens, *, eos_ids=(), embeddings=None, mask=None):
    """One request alone: greedy tokens until an EOS (kept) or max_tokens."""
    assert len(prompt) <= REF_WIDTH
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, : len(prompt)] = prompt
    emb = np.zeros((1, REF_WIDTH, CFG.hidden_size), np.float32)
    msk = np.zeros((1, REF_WIDTH), bool)
    if embeddings is not None:
        emb[0, : len(prompt)] = embeddings
        msk[0, : len(prompt)] = mask
    logits, cache = _ref_prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32),
                                 jnp.asarray(emb), jnp.asarray(msk))
    out = []
    while True:
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if token in eos_ids or len(out) == max_tokens:
            return out
        logits, cache = _ref_decode(graphdef, state, jnp.asarray([token], jnp.int32), cache)


def mixed_workload(seed, count=32):
    """Prompts of mixed lengths, most starting with one of three shared prefixes (whole pages and a part)."""
    rng = np.random.default_rng(seed)
    prefixes = [list(rng.integers(0, CFG.vocab_size, n)) for n in (21, 37, 10)]
    prompts, max_tokens = [], []
    for i in range(count):
        suffix = list(rng.integers(0, CFG.vocab_size, int(rng.integers(1, 30))))
        prefix = prefixes[i % 4] if i % 4 < 3 else []
        prompts.append([int(t) for t in prefix + suffix])
        max_tokens.append(int(rng.integers(1, 20)))
    return prompts, max_tokens


def test_32_concurrent_requests_match_each_run_alone(split_model):
    graphdef, state = split_model
    prompts, max_tokens = mixed_workload(seed=5)
    free_run = [reference_greedy(graphdef, state, p, m) for p, m in zip(prompts, max_tokens)]
    # The most frequent generated token becomes an EOS, so some requests stop early.
    values, counts = np.unique(np.concatenate([o[1:] for o in free_run if len(o) > 1]), return_counts=True)
    eos = int(values[np.argmax(counts)])
    want = [o[: o.index(eos) + 1] if eos in o else o for o in free_run]
    assert sum(len(w) < len(o) for w, o in zip(want, free_run)) >= 2  # the EOS really cuts some short

    # A pool of 20 pages of 8 tokens (160 slots) for up to 32 sequences of up to 85 tokens:
    # running sequences must be preempted again and again.
    engine = Engine(graphdef, state, eos_ids=[eos], **POOL, max_running=32, max_context=96)
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=m)) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    got = {r.request_id: [] for r in requests}
    finish = {}
    arrivals = list(requests)
    for r in arrivals[:6]:
        engine.add_request(r)
    arrivals = arrivals[6:]
    decoding_when_added = 0
    max_running_seen = 0
    while engine.has_unfinished() or arrivals:
        if arrivals:  # two more arrive each step while earlier ones decode
            decoding_when_added += any(got[rid] and rid not in finish for rid in got)
            for r in arrivals[:2]:
                engine.add_request(r)
            arrivals = arrivals[2:]
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
        max_running_seen = max(max_running_seen, engine.metrics()["running"])

    assert [got[r.request_id] for r in requests] == want
    for r, w in zip(requests, want):  # an EOS is a stop even when it is also the last token max_tokens allows
        assert finish[r.request_id] == (FinishReason.STOP if w[-1] == eos else FinishReason.LENGTH)
    metrics = engine.metrics()
    assert metrics["preemptions"] > 0
    assert metrics["prefix_hit_tokens"] > 0
    assert decoding_when_added > 0 and max_running_seen > 1
    assert metrics["running"] == 0 and metrics["waiting"] == 0
    # Nothing leaked: every page is free again (cached-but-unreferenced pages count as free).
    assert engine.allocator.num_free == 20 and engine.allocator.num_used == 0


def test_media_embeddings_are_served_as_the_core_computes_them(split_model):
    """The media seam: rows of a prompt given as embeddings, served beside a text request with the same ids."""
    graphdef, state = split_model
    rng = np.random.default_rng(8)
    prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, 29)]
    mask = np.zeros(len(prompt), bool)
    mask[9:20] = True  # an "image" of 11 rows in the middle
    embeddings = rng.normal(0.0, 1.0, (len(prompt), CFG.hidden_size)).astype(np.float32)
    want_media = reference_greedy(graphdef, state, prompt, 12, embeddings=embeddings, mask=mask)
    want_text = reference_greedy(graphdef, state, prompt, 12)
    assert want_media != want_text  # the embeddings matter

    engine = Engine(graphdef, state, **POOL)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    # Media first: were its pages registered under their token ids, the text requests would reuse them.
    got = engine.run_to_completion([Request("media", prompt, params, input_embeddings=embeddings, embedding_mask=mask)])
    hits_after_media = engine.metrics()["prefix_hit_tokens"]
    got.update(engine.run_to_completion([Request("text", prompt, params)]))
    hits_after_text = engine.metrics()["prefix_hit_tokens"]
    got.update(engine.run_to_completion([Request("text-again", prompt, params)]))
    assert got == {"media": want_media, "text": want_text, "text-again": want_text}
    # The text request may reuse only the media request's pages before its first media row (position 9:
    # one full page of 8); the second text request reuses all 3 full pages of its 29-token prompt.
    assert hits_after_media == 0 and hits_after_text == 8
    assert engine.metrics()["prefix_hit_tokens"] - hits_after_text == 24
    assert engine.allocator.num_free == 20
