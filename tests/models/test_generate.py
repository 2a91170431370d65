"""Generation mechanics: bounded compilations, EOS handling, sampling, bfloat16, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila import generate as gen
from jvila.config import LLMConfig
from jvila.models.llm import LLM

CFG = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(3)))


def prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, CFG.vocab_size, n)) for n in lengths]


def test_prompt_lengths_share_compilations(split_model):
    from serving.step import StepRunner

    graphdef, state = split_model
    for lengths in ([5], [12]):  # the 8- and 16-token step buckets of a one-page pool
        gen.generate(graphdef, state, prompts(lengths, 0), max_new_tokens=4)
    before = StepRunner.num_compilations()
    for lengths in ([3], [9], [1], [10]):  # prompt + 4 new tokens fit one page of 16: nothing new to compile
        gen.generate(graphdef, state, prompts(lengths, len(lengths)), max_new_tokens=4)
    assert StepRunner.num_compilations() == before
    # A prompt needing two pages compiles its prefill and its decode step once each, at most.
    gen.generate(graphdef, state, prompts([17], 5), max_new_tokens=4)
    assert before < StepRunner.num_compilations() <= before + 2


def test_bucket():
    assert [gen.bucket(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]


def test_eos_stops_each_sequence_and_is_kept(split_model):
    graphdef, state = split_model
    ps = prompts([4, 7], 1)
    free = gen.generate(graphdef, state, ps, max_new_tokens=10)
    eos = free[0][3]  # make the 4th greedy token of row 0 an EOS
    stopped = gen.generate(graphdef, state, ps, max_new_tokens=10, eos_ids=[eos])
    for row, out in zip(free, stopped):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:cut]


def test_sampling_is_seeded_and_differs_from_greedy(split_model):
    graphdef, state = split_model
    ps = prompts([6], 2)
    a = gen.generate(graphdef, state, ps, max_new_tokens=24, temperature=1.5, seed=1)
    b = gen.generate(graphdef, state, ps, max_new_tokens=24, temperature=1.5, seed=1)
    c = gen.generate(graphdef, state, ps, max_new_tokens=24, temperature=1.5, seed=2)
    greedy = gen.generate(graphdef, state, ps, max_new_tokens=24)
    assert a == b and a != c and a != greedy


@pytest.mark.parametrize("bad,kwargs,match", [
    ([[]], {"max_new_tokens": 2}, "at least one token"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1, CFG.vocab_size]], {"max_new_tokens": 2}, "token ids"),
])
def test_bad_input(split_model, bad, kwargs, match):
    graphdef, state = split_model
    with pytest.raises(ValueError, match=match):
        gen.generate(graphdef, state, bad, **kwargs)


def test_input_embeddings_stand_in_for_tokens(split_model):
    """Media enter as embeddings: passing the token embeddings themselves must change nothing."""
    from jvila.models import functional
    from jvila.models.attention import dense_attention
    from jvila.models.kv_cache import contiguous_cache

    graphdef, state = split_model
    tokens = jnp.asarray(prompts([10, 10], 9), jnp.int32)
    embeds = nnx.merge(graphdef, state).embed_tokens(tokens)
    want = functional.hidden_states(graphdef, state, tokens, attention=dense_attention)
    got = functional.hidden_states(graphdef, state, tokens, attention=dense_attention, input_embeddings=embeds)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    num_new = jnp.asarray([10, 6], jnp.int32)
    runs = [functional.extend(graphdef, state, tokens, num_new, contiguous_cache(CFG, 2, 16), attention=dense_attention,
                              input_embeddings=e) for e in (None, embeds)]
    np.testing.assert_array_equal(np.asarray(runs[0][0]), np.asarray(runs[1][0]))
