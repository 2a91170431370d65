"""On-device sampling against NumPy references: greedy, top-k / top-p support sets, the sampled
distribution, per-request seeds, logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.sampling import SamplingArrays, sample, truncate

sample_jit = jax.jit(sample, static_argnames=("num_top",))


def params(rows, temperature=0.0, top_k=0, top_p=1.0, seeds=0, output_index=0):
    def full(value, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(value), (rows,)).astype(dtype))

    return SamplingArrays(full(temperature, np.float32), full(top_k, np.int32), full(top_p, np.float32),
                          full(seeds, np.uint32), full(output_index, np.int32))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def support_reference(scaled, k, p):
    """Tokens a row may sample, the textbook way: sort, keep the top k, then the smallest prefix of
    those (renormalised) whose probability mass reaches p."""
    order = np.argsort(-scaled, kind="stable")
    k = len(scaled) if k == 0 else min(k, len(scaled))
    kept = order[:k]
    probs = np.exp(scaled[kept] - scaled[kept].max())
    probs /= probs.sum()
    cum = np.cumsum(probs)
    n = int(np.searchsorted(cum, p) + 1) if p < 1 else k  # first prefix with mass >= p
    return set(kept[: min(n, k)].tolist())


def test_greedy_rows_take_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32) * 3
    # Rows 1 and 4 sample (hot, flat); the others are greedy whatever their top-k/top-p say.
    temperature = np.array([0, 2.0, 0, 0, 2.0, 0], np.float32)
    out = sample_jit(jnp.asarray(logits), params(6, temperature, top_k=3, top_p=0.5, seeds=np.arange(6)))
    greedy = temperature == 0
    np.testing.assert_array_equal(np.asarray(out.tokens)[greedy], logits.argmax(-1)[greedy])


@pytest.mark.parametrize("vocab", [37, 200])
def test_truncation_support_matches_numpy(vocab):
    rng = np.random.default_rng(vocab)
    rows = 24
    scaled = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4, (rows, 1))).astype(np.float32)
    top_k = rng.choice([0, 1, 2, 5, vocab - 1, vocab, vocab + 3], rows)
    # Place p halfway between two cumulative masses of the top-k-renormalised distribution, so
    # float32 rounding cannot move the cut; some rows keep p = 1 (off).
    top_p = np.ones(rows, np.float32)
    for r in range(rows):
        if r % 4 == 3:
            continue
        order = np.argsort(-scaled[r])
        k = vocab if top_k[r] == 0 else min(top_k[r], vocab)
        probs = np.exp(scaled[r, order[:k]] - scaled[r, order[0]])
        cum = np.cumsum(probs / probs.sum())
        cut = rng.integers(0, k)
        top_p[r] = (cum[cut] + (cum[cut - 1] if cut else 0.0)) / 2 if cum[cut] < 1 - 1e-4 else 1.0
    kept = np.asarray(jax.jit(truncate)(jnp.asarray(scaled), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p)))
    for r in range(rows):
        got = set(np.flatnonzero(np.isfinite(kept[r])).tolist())
        assert got == support_reference(scaled[r], top_k[r], top_p[r]), r
        np.testing.assert_array_equal(kept[r][list(got)], scaled[r][list(got)])  # kept logits untouched


def test_draws_follow_the_truncated_softmax():
    """Many draws of one row (distinct output indices): only supported tokens appear, and their
    frequencies match softmax(logits / T) renormalised over the support."""
    rng = np.random.default_rng(1)
    vocab, draws, temperature = 12, 6000, 1.7
    logits = rng.standard_normal(vocab).astype(np.float32) * 2
    top_k, top_p = 8, 0.9
    support = sorted(support_reference(logits / temperature, top_k, top_p))
    out = sample_jit(jnp.asarray(np.broadcast_to(logits, (draws, vocab))),
                     params(draws, temperature, top_k, top_p, seeds=123, output_index=np.arange(draws)))
    counts = np.bincount(np.asarray(out.tokens), minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(support)
    want = np.exp(logits[support] / temperature - (logits[support] / temperature).max())
    want /= want.sum()
    freq = counts[support] / draws
    # Binomial standard error; 5 sigma makes a false alarm negligible, while a wrong temperature or
    # a missing renormalisation shifts frequencies by many sigmas at 6000 draws.
    sigma = np.sqrt(want * (1 - want) / draws)
    assert np.all(np.abs(freq - want) < 5 * sigma + 1e-3)


def test_a_requests_draws_depend_on_its_seed_and_index_only():
    rng = np.random.default_rng(2)
    vocab = 1000
    flat = rng.standard_normal((1, vocab)).astype(np.float32) * 0.1  # near uniform: draws spread widely
    seed, index = 777, 5

    def draw(row_logits, seeds, indices):
        n = len(seeds)
        out = sample_jit(jnp.asarray(row_logits), params(n, 1.0, seeds=np.asarray(seeds),
                                                          output_index=np.asarray(indices)))
        return np.asarray(out.tokens)

    alone = draw(flat, [seed], [index])[0]
    # Same request among others, at another position, beside greedy rows and other seeds.
    others = rng.standard_normal((5, vocab)).astype(np.float32)
    batch = np.concatenate([others[:3], flat, others[3:]])
    seeds = [1, 2, 3, seed, 4, 5]
    indices = [0, 9, 2, index, 1, 7]
    assert draw(batch, seeds, indices)[3] == alone
    mixed = sample_jit(jnp.asarray(batch), params(6, np.array([0, 1, 0, 1, 0, 1.0]), seeds=np.asarray(seeds),
                                                   output_index=np.asarray(indices)))
    assert int(mixed.tokens[3]) == alone
    # And it does depend on them: across 40 seeds / 40 indices the draws vary.
    assert len(set(draw(np.repeat(flat, 40, 0), np.arange(40), [index] * 40))) > 20
    assert len(set(draw(np.repeat(flat, 40, 0), [seed] * 40, np.arange(40)))) > 20


def test_logprobs_match_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 300)).astype(np.float32) * 4
    temperature = np.array([0, 0.7, 1.3, 0, 2.0], np.float32)
    out = sample_jit(jnp.asarray(logits), params(5, temperature, top_p=0.95, seeds=np.arange(5)), num_top=4)
    ref = log_softmax(logits.astype(np.float64))
    tokens = np.asarray(out.tokens)
    # float32 log_softmax vs a float64 one: rounding at the 1e-5 level.
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[np.arange(5), tokens], atol=1e-5)
    want_ids = np.argsort(-ref, axis=-1)[:, :4]
    np.testing.assert_array_equal(np.asarray(out.top_ids), want_ids)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(ref, want_ids, -1), atol=1e-5)
    none = sample_jit(jnp.asarray(logits), params(5), num_top=0)
    assert none.top_ids.shape == (5, 0)
