"""The decoder against transformers on tiny random configs, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_hf import TINY_CONFIGS, random_hf_model, random_tokens, to_jvila

from jvila.generate import generate
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache

# Both sides compute in float32 with different op orders; 1e-4 relative to the largest logit leaves
# ~100x headroom over the ~1e-6 seen, while a wrong rope, bias or layout gives errors of order 1.
RTOL = 1e-4


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    hf = random_hf_model(request.param, seed=len(request.param))
    return hf, nnx.split(to_jvila(hf))


def test_logits_match_transformers(pair):
    hf, (graphdef, state) = pair
    tokens = random_tokens(hf.config.vocab_size, (3, 37), seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    out = functional.logits(graphdef, state, jnp.asarray(tokens), attention=dense_attention)
    assert rel_err(out, ref) < RTOL


def test_chunked_cache_matches_full_forward():
    """Prefill in uneven chunks through the paged cache, then decode: same logits as one pass.

    Ours against ours, so one family suffices: llama's config has the most that positions touch
    (llama3 rope scaling at cache offsets, GQA, attention biases)."""
    hf = random_hf_model("llama", seed=len("llama"))
    graphdef, state = nnx.split(to_jvila(hf))
    tokens = random_tokens(hf.config.vocab_size, (2, 30), seed=2)
    full = np.asarray(functional.logits(graphdef, state, jnp.asarray(tokens), attention=dense_attention))
    cfg = nnx.merge(graphdef, state).config
    cache = contiguous_cache(cfg, 2, 40, page_size=4)  # 4 does not divide the chunk boundaries
    done = np.zeros(2, int)
    for chunk in ([11, 5], [7, 13], [9, 9]):  # per-row real tokens; rows advance unevenly
        width = max(chunk)
        block = np.zeros((2, width), np.int32)
        for b, n in enumerate(chunk):
            block[b, :n] = tokens[b, done[b] : done[b] + n]
        lg, cache = functional.extend(graphdef, state, jnp.asarray(block), jnp.asarray(chunk, jnp.int32), cache,
                                      attention=dense_attention)
        done += chunk
        want = np.stack([full[b, done[b] - 1] for b in range(2)])
        assert rel_err(lg, want) < RTOL
    assert list(np.asarray(cache.lengths)) == list(done)
    lg, cache = functional.decode_step(graphdef, state, jnp.asarray(tokens[:, 27]), cache, attention=dense_attention)
    # Row 0 has consumed 27 tokens, so its decode input is token 27 (position 27).
    assert rel_err(lg[0], full[0, 27]) < RTOL


def test_greedy_generation_matches_transformers(pair):
    hf, (graphdef, state) = pair
    prompts = [list(random_tokens(hf.config.vocab_size, (n,), seed=n)) for n in (3, 17, 9)]
    outs = generate(graphdef, state, prompts, max_new_tokens=12, eos_ids=())
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_packed_segments_match_separate_sequences(pair):
    hf, (graphdef, state) = pair
    a = random_tokens(hf.config.vocab_size, (1, 9), seed=3)
    b = random_tokens(hf.config.vocab_size, (1, 14), seed=4)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[0] * 9 + [1] * 14], np.int32)
    positions = np.array([list(range(9)) + list(range(14))], np.int32)
    out = functional.logits(graphdef, state, jnp.asarray(packed), attention=dense_attention,
                            positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    sep_a = functional.logits(graphdef, state, jnp.asarray(a), attention=dense_attention)
    sep_b = functional.logits(graphdef, state, jnp.asarray(b), attention=dense_attention)
    assert rel_err(out[:, :9], sep_a) < RTOL
    assert rel_err(out[:, 9:], sep_b) < RTOL


def test_loss_matches_transformers_and_differentiates(pair):
    hf, (graphdef, state) = pair
    tokens = random_tokens(hf.config.vocab_size, (2, 21), seed=5)
    with torch.no_grad():
        ref = float(hf(torch.tensor(tokens, dtype=torch.long), labels=torch.tensor(tokens, dtype=torch.long)).loss)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    weights = jnp.ones(targets.shape)

    def loss_of(st):
        return functional.loss(graphdef, st, inputs, targets, weights, attention=dense_attention)

    value, grads = jax.value_and_grad(loss_of)(state)
    assert abs(float(value) - ref) < 1e-4 * abs(ref)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves) and any(float(jnp.abs(g).max()) > 0 for g in leaves)
    # Zero weights remove positions from the mean: weighting out the second row equals row 0 alone.
    half = functional.loss(graphdef, state, inputs, targets, weights.at[1].set(0.0), attention=dense_attention)
    row0 = functional.loss(graphdef, state, inputs[:1], targets[:1], weights[:1], attention=dense_attention)
    assert abs(float(half) - float(row0)) < 1e-5 * abs(float(row0))
