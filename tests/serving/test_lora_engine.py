"""Multi-LoRA through the engine: eight adapters of ranks 8..64 and the base model in one batch, each
request's greedy output equal to that of the model with its adapter merged into the base weights.

The reference runs each request alone through the functional core (padded `extend` and
`decode_step` on a contiguous cache) over base weights with the adapter merged by
`jvila.models.lora.merge`: no adapter path at all. The engine gathers the adapters out of its KV
page pool and adds them per token with the batched kernels. Float32 throughout, so greedy tokens
agree exactly (the tiny model's top logits are far apart next to float32 rounding).
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
from jvila.models.lora import Adapter, LoraConfig, merge, module_shape
from serving.adapters.store import (
    AdapterInUse,
    AdapterStore,
    UnknownAdapter,
    stored_adapter,
)
from serving.engine import Engine
from serving.request import Request, SamplingParams

CFG = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_position_embeddings=512)
REF_WIDTH = 32
MAX_TOKENS = 6
TARGETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(5)))


def random_adapter(rng, rank, targets, use_rslora=False):
    weights = {}
    for layer in range(CFG.num_layers):
        weights[layer] = {}
        for m in targets:
            d_in, d_out = module_shape(CFG, m)
            # Large enough that each adapter changes the greedy tokens (checked below).
            weights[layer][m] = (rng.standard_normal((d_in, rank)).astype(np.float32) / np.sqrt(d_in),
                                 rng.standard_normal((rank, d_out)).astype(np.float32) * 2 / np.sqrt(rank))
    return Adapter(LoraConfig(rank, alpha=float(rank) * rng.uniform(0.5, 2), use_rslora=use_rslora,
                              target_modules=targets), weights)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ref_prefill(graphdef, state, tokens, length):
    cache = contiguous_cache(CFG, 1, REF_WIDTH + 16, page_size=16)
    return functional.extend(graphdef, state, tokens, length, cache, attention=dense_attention)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ref_decode(graphdef, state, token, cache):
    return functional.decode_step(graphdef, state, token, cache, attention=dense_attention)


def reference_greedy(graphdef, state, prompt, max_tokens):
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, : len(prompt)] = prompt
    logits, cache = _ref_prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    out = [int(jnp.argmax(logits[0]))]
    while len(out) < max_tokens:
        logits, cache = _ref_decode(graphdef, state, jnp.asarray([out[-1]], jnp.int32), cache)
        out.append(int(jnp.argmax(logits[0])))
    return out


def test_eight_adapters_of_ranks_8_to_64_in_one_batch_match_their_merged_models(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(0)
    ranks = [8, 16, 24, 32, 40, 48, 56, 64]
    adapters = {f"lora{r}": random_adapter(rng, r, TARGETS[i % len(TARGETS)], use_rslora=i == 5)
                for i, r in enumerate(ranks)}
    store = AdapterStore(CFG, max_rank=64)
    for name, adapter in adapters.items():
        store.add(name, stored_adapter(adapter, CFG.num_layers))
    engine = Engine(graphdef, state, num_pages=800, page_size=8, token_budget=256, max_running=16,
                    attention=dense_attention, adapters=store)
    # Three waves joining a running batch: the large ranks (and the base model), then small ranks that the
    # kept working set takes into its free columns, then one that grows it to the next column bucket.
    waves = [["lora64", "lora56", "lora48", "lora40", None], ["lora8", "lora16", "lora24", None], ["lora32"]]
    names = [name for wave in waves for name in wave]
    prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, int(rng.integers(5, 20)))] for _ in names]
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), adapter=name)
                for i, (p, name) in enumerate(zip(prompts, names))]
    arrivals = {0: requests[:5], 2: requests[5:9], 4: requests[9:]}
    outputs = {r.request_id: [] for r in requests}
    step, rows = 0, []
    while engine.has_unfinished() or step <= max(arrivals):
        for request in arrivals.get(step, []):
            engine.add_request(request)
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        rows.append(engine.metrics()["last_step_rows"])
        step += 1
    assert max(rows) == len(requests)  # all eight adapters and the base model in one batch at some step
    if jax.default_backend() == "cpu":  # the columns layout: read whole once, then added to and laid out again
        m = engine.metrics()
        assert m["working_set_builds"] == 1 and m["working_set_additions"] >= 1 and m["working_set_relayouts"] >= 1
    differs = 0
    for request, name in zip(requests, names):
        merged = state if name is None else merge(graphdef, state, adapters[name])
        want = reference_greedy(graphdef, merged, request.prompt_ids, MAX_TOKENS)
        assert outputs[request.request_id] == want, name
        if name is not None:
            differs += want != reference_greedy(graphdef, state, request.prompt_ids, MAX_TOKENS)
    assert differs >= 6  # the adapters matter: the base model's tokens would not pass
    m = engine.metrics()
    assert m["adapters_resident"] == 8 and m["adapter_loads"] == 8


def test_unknown_adapter_and_unloading_one_in_use_are_refused(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(1)
    store = AdapterStore(CFG, max_rank=16)
    store.add("a", stored_adapter(random_adapter(rng, 8, ("q_proj",)), CFG.num_layers))
    engine = Engine(graphdef, state, num_pages=40, page_size=8, token_budget=32, attention=dense_attention,
                    adapters=store)
    with pytest.raises(UnknownAdapter, match="'nope'"):
        engine.add_request(Request("x", [1, 2, 3], adapter="nope"))
    engine.add_request(Request("z", [1, 2, 3], adapter="a"))
    assert engine.adapters.requests_using("a") == 1
    engine.abort("z")  # while waiting: the adapter is free again
    assert engine.adapters.requests_using("a") == 0 and [o.request_id for o in engine.step()] == ["z"]
    engine.add_request(Request("y", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), adapter="a"))
    with pytest.raises(AdapterInUse, match="1 request"):
        engine.adapters.remove("a")  # waiting
    engine.step()
    with pytest.raises(AdapterInUse):
        engine.adapters.remove("a")  # running
    free_with_adapter = engine.allocator.num_free
    while engine.has_unfinished():
        engine.step()
    engine.adapters.remove("a")
    assert "a" not in store and engine.allocator.num_free > free_with_adapter
    assert engine.allocator.num_free == 40  # the adapter's pages and the request's all came back
