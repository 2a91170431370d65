"""Engine mechanics on the real allocator, scheduler and device step: stops, abort, budget, seeds, logprobs.

Greedy equality with the functional core under load is in test_engine_equivalence.py.
"""

import dataclasses

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

# The model and pool of test_engine_equivalence.py: run together, the two files share the step's compilations.
CFG = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=512)
NUM_PAGES = 20


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(4)))


def make_engine(split_model, **kwargs):
    graphdef, state = split_model
    kwargs = {"num_pages": NUM_PAGES, "page_size": 8, "token_budget": 32, "attention": dense_attention, **kwargs}
    return Engine(graphdef, state, **kwargs)


def random_prompt(rng, n):
    return [int(t) for t in rng.integers(0, CFG.vocab_size, n)]


def letters(ids):
    """A toy detokenizer: one letter per token id."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


def test_bad_requests_are_refused_clearly(split_model):
    engine = make_engine(split_model, max_context=40)
    engine.add_request(Request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request(Request("a", [4]))
    with pytest.raises(ValueError, match="no room for output"):
        engine.add_request(Request("long", list(range(40))))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request("vocab", [1, CFG.vocab_size]))
    with pytest.raises(ValueError, match="detokenize"):
        engine.add_request(Request("stop", [1], SamplingParams(stop=("x",))))
    with pytest.raises(ValueError, match="hidden size"):
        engine.add_request(Request("media", [1, 2], input_embeddings=np.ones((2, 7), np.float32),
                                   embedding_mask=np.ones(2, bool)))
    with pytest.raises(ValueError, match="max_context"):
        make_engine(split_model, num_pages=4, page_size=4, max_context=17)  # more than the pool holds
    assert engine.metrics()["waiting"] == 1  # refused requests left no trace


def test_stop_token_ids_eos_and_ignore_eos(split_model):
    rng = np.random.default_rng(1)
    prompt = random_prompt(rng, 13)
    free = make_engine(split_model).run_to_completion([Request("f", prompt, SamplingParams(max_tokens=12))])["f"]
    stop = free[4]
    cut = free[: free.index(stop) + 1]
    engine = make_engine(split_model, eos_ids=[stop])
    outs = []
    engine.add_request(Request("eos", prompt, SamplingParams(max_tokens=12)))
    engine.add_request(Request("ignore", prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    engine.add_request(Request("stop-id", prompt, SamplingParams(max_tokens=12, ignore_eos=True,
                                                                 stop_token_ids=(stop,))))
    while engine.has_unfinished():
        outs += engine.step()
    tokens = {rid: [t for o in outs if o.request_id == rid for t in o.new_token_ids]
              for rid in ("eos", "ignore", "stop-id")}
    last = {o.request_id: o for o in outs if o.finish_reason is not None}
    assert tokens == {"eos": cut, "ignore": free, "stop-id": cut}
    assert [last[r].finish_reason for r in ("eos", "ignore", "stop-id")] == [
        FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP]
    assert last["ignore"].num_output_tokens == 12 and last["eos"].num_prompt_tokens == 13
    assert engine.allocator.num_free == NUM_PAGES


def test_context_limit_ends_with_length(split_model):
    rng = np.random.default_rng(2)
    engine = make_engine(split_model, max_context=30)
    engine.add_request(Request("c", random_prompt(rng, 23), SamplingParams(max_tokens=50, ignore_eos=True)))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert sum(len(o.new_token_ids) for o in outs) == 30 - 23  # prompt + output fill the context exactly
    assert outs[-1].finish_reason == FinishReason.LENGTH


def test_stop_string_cuts_the_text(split_model):
    rng = np.random.default_rng(3)
    prompt = random_prompt(rng, 9)
    free = make_engine(split_model).run_to_completion([Request("f", prompt, SamplingParams(max_tokens=10))])["f"]
    text = letters(free)
    stop = text[5:7]  # two letters spanning tokens 5 and 6: found once token 6 is out
    first = text.find(stop)
    engine = make_engine(split_model, detokenize=letters)
    engine.add_request(Request("s", prompt, SamplingParams(max_tokens=10, stop=("zzzz", stop))))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    got = [t for o in outs for t in o.new_token_ids]
    assert got == free[: first + 2]
    assert outs[-1].finish_reason == FinishReason.STOP and outs[-1].text == text[:first]


def test_abort_frees_pages_at_once_and_reports(split_model):
    rng = np.random.default_rng(4)
    engine = make_engine(split_model, max_running=2)
    for rid in ("a", "b", "c"):
        engine.add_request(Request(rid, random_prompt(rng, 10), SamplingParams(max_tokens=30, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.metrics()["running"] == 2 and engine.metrics()["waiting"] == 1
    used = engine.allocator.num_used
    engine.abort("a")  # running
    assert engine.allocator.num_used < used  # freed now, not at the next step
    engine.abort("c")  # still waiting
    engine.abort("nobody")  # unknown ids are ignored
    outs = engine.step()
    aborted = {o.request_id for o in outs if o.finish_reason == FinishReason.ABORT}
    assert aborted == {"a", "c"}
    later = []
    while engine.has_unfinished():
        later += engine.step()
    assert {o.request_id for o in later} == {"b"}
    assert engine.metrics()["aborted"] == 2 and engine.allocator.num_free == NUM_PAGES
    engine.add_request(Request("a", [1, 2]))  # the id is free again


def test_token_budget_chunks_prompts_and_bounds_rows(split_model):
    rng = np.random.default_rng(5)
    engine = make_engine(split_model, token_budget=16, max_running=3)
    for i in range(5):
        engine.add_request(Request(f"r{i}", random_prompt(rng, 37 if i == 0 else 5),
                                   SamplingParams(max_tokens=6, ignore_eos=True)))
    first_token_step = {}
    step = 0
    while engine.has_unfinished():
        outs = engine.step()
        step += 1
        m = engine.metrics()
        assert m["last_step_tokens"] <= 16 and m["last_step_rows"] <= 3
        for o in outs:
            first_token_step.setdefault(o.request_id, step)
    assert first_token_step["r0"] == 3  # 37 prompt tokens at 16 per step: three chunks


def test_seeded_sampling_does_not_depend_on_the_batch_or_preemption(split_model):
    rng = np.random.default_rng(6)
    prompt = random_prompt(rng, 11)
    sampled = SamplingParams(max_tokens=16, temperature=1.3, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    alone = make_engine(split_model).run_to_completion([Request("s", prompt, sampled)])["s"]
    # The same request among greedy ones that need 42 pages of the pool's 20: sequences get preempted.
    engine = make_engine(split_model)
    others = [Request(f"g{i}", random_prompt(rng, 30), SamplingParams(max_tokens=20, ignore_eos=True))
              for i in range(6)]
    crowded = engine.run_to_completion(others[:3] + [Request("s", prompt, sampled)] + others[3:])["s"]
    assert engine.metrics()["preemptions"] > 0 and engine.allocator.num_free == NUM_PAGES
    assert crowded == alone
    other_seed = make_engine(split_model).run_to_completion(
        [Request("s", prompt, dataclasses.replace(sampled, seed=8))])["s"]
    greedy = make_engine(split_model).run_to_completion([Request("s", prompt, SamplingParams(max_tokens=16))])["s"]
    assert other_seed != alone and greedy != alone


def test_logprobs_match_the_core(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(7)
    prompt = random_prompt(rng, 14)
    engine = make_engine(split_model)
    engine.add_request(Request("l", prompt, SamplingParams(max_tokens=1, logprobs=3)))
    (out,) = engine.step()
    logits, _ = functional.extend(graphdef, state, jnp.asarray([prompt], jnp.int32), jnp.asarray([14], jnp.int32),
                                  contiguous_cache(CFG, 1, 16), attention=dense_attention)
    log_probs = np.asarray(jax.nn.log_softmax(logits[0]))
    best = np.argsort(-log_probs)[:3]
    (lp,) = out.new_logprobs
    assert lp.token_id == out.new_token_ids[0] == best[0]
    assert [t for t, _ in lp.top] == list(best)
    # Same float32 math on both sides; the tolerance covers a different reduction order only.
    np.testing.assert_allclose([v for _, v in lp.top], log_probs[best], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp.logprob, log_probs[best[0]], rtol=1e-5, atol=1e-5)


def test_shared_prefix_pages_and_metrics(split_model):
    rng = np.random.default_rng(8)
    system = random_prompt(rng, 16)
    engine = make_engine(split_model)
    engine.run_to_completion([Request("first", system + random_prompt(rng, 3), SamplingParams(max_tokens=2),
                                      client="alice")])
    engine.add_request(Request("second", system + random_prompt(rng, 5), SamplingParams(max_tokens=4),
                               client="bob"))
    engine.step()
    m = engine.metrics()
    assert m["prefix_hit_tokens"] == 16 and m["pages_shared"] == 0  # the first request is gone: cached only
    assert m["prompt_tokens_computed"] == 19 + 5  # the second prompt's 16 shared tokens were not recomputed
    assert set(m["client_service"]) == {"alice", "bob"}
