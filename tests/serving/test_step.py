"""The serving step: packed batches through StepRunner against per-sequence generation, logprobs,
media, copy-on-write page copies, bounded compilations and bad input."""

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
from serving.step import MIN_CONTEXT, StepBatch, StepRunner, page_bucket

CFG = LLMConfig(vocab_size=83, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)
PAGE = 4


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(5)))


_extend = jax.jit(functional.extend, static_argnames=("graphdef", "attention"))


def greedy_alone(graphdef, state, prompt, new_tokens):
    """The reference: one prompt alone through the padded extend on a contiguous cache, greedy."""
    cache = contiguous_cache(CFG, 1, 40, page_size=PAGE)
    block = np.zeros((1, 16), np.int32)
    block[0, : len(prompt)] = prompt
    logits, cache = _extend(graphdef, state, jnp.asarray(block), jnp.asarray([len(prompt)], jnp.int32), cache,
                            attention=dense_attention)
    out = []
    for _ in range(new_tokens):
        out.append(int(jnp.argmax(logits[0])))
        logits, cache = _extend(graphdef, state, jnp.asarray([[out[-1]]], jnp.int32), jnp.ones(1, jnp.int32), cache,
                                attention=dense_attention)
    return out


class Rows:
    """Host-side bookkeeping a tiny engine would do: pages handed out at random, prompts fed in
    chunks, then one token per step."""

    def __init__(self, rng, num_pages, pages_per_row):
        self.free = list(rng.permutation(num_pages))
        self.pages_per_row = pages_per_row
        self.tables, self.context, self.pending, self.out = {}, {}, {}, {}

    def add(self, name, prompt):
        self.tables[name] = [self.free.pop() for _ in range(self.pages_per_row)]
        self.context[name], self.pending[name], self.out[name] = 0, list(prompt), []

    def batch(self, take, **sampling):
        names = list(take)
        chunks = [self.pending[n][: take[n]] for n in names]
        cu = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int32)
        return names, StepBatch(
            token_ids=np.concatenate(chunks).astype(np.int32), cu_q_lens=cu,
            context_lens=np.asarray([self.context[n] for n in names], np.int32),
            page_table=np.asarray([self.tables[n] for n in names], np.int32), **sampling)

    def advance(self, names, batch, result):
        for i, n in enumerate(names):
            took = int(batch.cu_q_lens[i + 1] - batch.cu_q_lens[i])
            self.context[n] += took
            self.pending[n] = self.pending[n][took:]
            if not self.pending[n]:  # prompt done (or a decode token consumed): the row's token counts
                self.out[n].append(int(result.next_tokens[i]))
                self.pending[n] = [int(result.next_tokens[i])]


def test_mixed_steps_reproduce_generation_of_each_prompt_alone(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(0)
    prompts = {name: list(rng.integers(0, CFG.vocab_size, n)) for name, n in zip("abcd", (9, 3, 14, 6))}
    want = {n: greedy_alone(graphdef, state, p, 5) for n, p in prompts.items()}
    runner = StepRunner(graphdef, state, num_pages=30, page_size=PAGE, max_pages_per_seq=6)
    rows = Rows(rng, 30, 6)
    rows.add("a", prompts["a"])
    rows.add("b", prompts["b"])
    # a's prompt in two chunks beside b's whole prompt; c arrives while a and b decode and is
    # chunked; d arrives last; a row with nothing to do sits out of the batch.
    plan = [{"a": 5, "b": 3}, {"a": 4, "b": 1}, "add c", {"a": 1, "b": 1, "c": 6}, {"c": 8, "a": 1},
            "add d", {"d": 6, "c": 1, "b": 1, "a": 1}]
    plan += [{"a": 1, "b": 1, "c": 1, "d": 1}] * 4
    for step in plan:
        if isinstance(step, str):
            name = step.split()[1]
            rows.add(name, prompts[name])
            continue
        names, batch = rows.batch(step)
        rows.advance(names, batch, runner.run(batch))
    for name in prompts:
        assert rows.out[name][:5] == want[name], name


def test_logprobs_are_those_of_the_model(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (7, 4)]
    runner = StepRunner(graphdef, state, num_pages=12, page_size=PAGE, max_pages_per_seq=3, max_logprobs=6)
    batch = StepBatch(np.concatenate(prompts).astype(np.int32), np.asarray([0, 7, 11], np.int32),
                      np.zeros(2, np.int32), np.asarray([[5, 1, 9], [0, 11, 3]], np.int32),
                      temperature=np.asarray([0.0, 1.0], np.float32), seeds=np.asarray([3, 2**40 + 5]),
                      output_index=np.zeros(2, np.int32), num_logprobs=4)
    result = runner.run(batch)
    # The padded extend on a fresh cache gives the reference logits.
    block = np.zeros((2, 7), np.int32)
    block[0], block[1, :4] = prompts[0], prompts[1]
    logits, _ = functional.extend(graphdef, state, jnp.asarray(block), jnp.asarray([7, 4], jnp.int32),
                                  contiguous_cache(CFG, 2, 8, page_size=PAGE), attention=dense_attention)
    ref = np.asarray(logits, np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    assert result.next_tokens[0] == ref[0].argmax()
    # float32 on both sides, different shapes: rounding only.
    np.testing.assert_allclose(result.logprobs, ref[[0, 1], result.next_tokens], atol=2e-5)
    np.testing.assert_array_equal(result.top_ids, np.argsort(-ref, -1)[:, :4])
    np.testing.assert_allclose(result.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :4], atol=2e-5)


def test_sampled_request_does_not_depend_on_its_batch(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(2)
    prompt = list(rng.integers(0, CFG.vocab_size, 5))
    other = list(rng.integers(0, CFG.vocab_size, 11))

    def run(with_other):
        runner = StepRunner(graphdef, state, num_pages=20, page_size=PAGE, max_pages_per_seq=5)
        rows = Rows(np.random.default_rng(3), 20, 5)
        rows.add("x", prompt)
        if with_other:
            rows.add("y", other)
        for step in range(8):
            take = {"y": 11 if step == 0 else 1, "x": 5 if step == 0 else 1} if with_other else {
                "x": 5 if step == 0 else 1}
            names = list(take)
            sampling = dict(temperature=np.asarray([1.5 if n == "x" else 0.7 for n in names], np.float32),
                            top_p=np.asarray([0.9 if n == "x" else 1.0 for n in names], np.float32),
                            seeds=np.asarray([42 if n == "x" else 7 for n in names]),
                            output_index=np.asarray([len(rows.out[n]) for n in names], np.int32))
            names, batch = rows.batch(take, **sampling)
            rows.advance(names, batch, runner.run(batch))
        return rows.out["x"]

    alone = run(False)
    assert run(True) == alone
    assert alone != greedy_alone(graphdef, state, prompt, 8)  # it did sample


def test_media_embeddings_enter_the_step(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, CFG.vocab_size, 9).astype(np.int32)
    media = rng.standard_normal((9, CFG.hidden_size)).astype(np.float32)
    mask = np.zeros(9, bool)
    mask[2:6] = True
    runner = StepRunner(graphdef, state, num_pages=6, page_size=PAGE, max_pages_per_seq=3, max_logprobs=3)
    batch = StepBatch(prompt, np.asarray([0, 9]), np.zeros(1, np.int32), np.asarray([[4, 0, 2]]),
                      input_embeddings=media, embedding_mask=mask, num_logprobs=3)
    got = runner.run(batch)
    model = nnx.merge(graphdef, state)
    spliced = np.where(mask[:, None], media, np.asarray(model.embed_tokens(jnp.asarray(prompt))))
    hidden = functional.hidden_states(graphdef, state, jnp.asarray(prompt)[None], attention=dense_attention,
                                      input_embeddings=jnp.asarray(spliced)[None])
    ref = np.asarray(jax.nn.log_softmax(model.logits(hidden[0, -1])))
    np.testing.assert_array_equal(got.top_ids[0], np.argsort(-ref)[:3])
    np.testing.assert_allclose(got.top_logprobs[0], np.sort(ref)[::-1][:3], atol=2e-5)


def test_copy_pages_forks_a_sequence(split_model):
    """A prompt's pages copied to fresh pages (copy-on-write after a fork): decoding from the copy
    gives what decoding from the original gives, and the pools hold identical pages."""
    graphdef, state = split_model
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, CFG.vocab_size, 10).astype(np.int32)  # 2.5 pages of 4
    runner = StepRunner(graphdef, state, num_pages=16, page_size=PAGE, max_pages_per_seq=4, max_logprobs=5)
    first = runner.run(StepBatch(prompt, np.asarray([0, 10]), np.zeros(1, np.int32), np.asarray([[7, 2, 12, 0]])))
    # The child shares full pages 7 and 2 and copies the partly filled page 12 to page 3.
    runner.copy_pages([(12, 3)])
    runner.copy_pages([])  # nothing to do
    for pool in runner.k_pages + runner.v_pages:
        np.testing.assert_array_equal(np.asarray(pool[3]), np.asarray(pool[12]))
    token = np.repeat(first.next_tokens, 2).astype(np.int32)
    result = runner.run(StepBatch(token, np.asarray([0, 1, 2]), np.asarray([10, 10], np.int32),
                                  np.asarray([[7, 2, 12, 0], [7, 2, 3, 1]]), num_logprobs=5))
    assert result.next_tokens[0] == result.next_tokens[1]
    np.testing.assert_allclose(result.top_logprobs[0], result.top_logprobs[1], atol=1e-6)
    np.testing.assert_array_equal(result.top_ids[0], result.top_ids[1])
    with pytest.raises(ValueError, match="page ids"):
        runner.copy_pages([(1, 16)])
    with pytest.raises(ValueError, match="distinct"):
        runner.copy_pages([(1, 4), (2, 4)])



@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_write_pages_lays_values_out_page_by_page(split_model, cache_dtype):
    """Adapter values [layers, n] go to the named pages, each page's K part then its V part, zeros past n;
    every other page keeps what it held, and values that do not fit the pages are refused."""
    graphdef, state = split_model
    runner = StepRunner(graphdef, state, num_pages=12, page_size=PAGE, max_pages_per_seq=4, cache_dtype=cache_dtype)
    rng = np.random.default_rng(8)
    runner.k_pages = tuple(jnp.asarray(rng.standard_normal(p.shape), cache_dtype) for p in runner.k_pages)
    runner.v_pages = tuple(jnp.asarray(rng.standard_normal(p.shape), cache_dtype) for p in runner.v_pages)
    half = PAGE * CFG.num_kv_heads * CFG.head_dim
    # Three pages each time, not in order (a bucket of 4: one dropped padding entry); the second write has fewer
    # values, so whatever the first left in the host buffers it reuses must not reach the pools.
    for pages, count in (([9, 2, 5], 5 * half + 7), ([0, 11, 3], 2 * half + 5)):
        before = [np.asarray(p, np.float32) for p in runner.k_pages + runner.v_pages]
        values = rng.standard_normal((CFG.num_layers, count)).astype(np.float32)
        values = np.concatenate([values, np.zeros((CFG.num_layers, 9), np.float32)], axis=1)  # a stream's padding
        runner.write_pages(pages, values)
        for layer in range(CFG.num_layers):
            want = np.zeros((len(pages) * 2 * half,), np.float32)
            want[: values.shape[1]] = values[layer]
            want = want.astype(cache_dtype).astype(np.float32).reshape(len(pages), 2, PAGE, CFG.num_kv_heads, -1)
            for pools, part, offset in ((runner.k_pages, 0, 0), (runner.v_pages, 1, CFG.num_layers)):
                got = np.asarray(pools[layer], np.float32)
                np.testing.assert_array_equal(got[pages], want[:, part])
                others = [p for p in range(12) if p not in pages]
                np.testing.assert_array_equal(got[others], before[offset + layer][others])
    with pytest.raises(ValueError, match="do not fit"):
        runner.write_pages([3], values)
    with pytest.raises(ValueError, match="layers"):
        runner.write_pages([3], values[:1])


def test_compilations_are_bounded_by_buckets(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng(6)
    pages_per_row = 2 * MIN_CONTEXT // PAGE
    num_pages = 4 * pages_per_row + 3
    runner = StepRunner(graphdef, state, num_pages=num_pages, page_size=PAGE, max_pages_per_seq=pages_per_row)

    def step(q_lens, context):
        rows = len(q_lens)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        table = rng.permutation(num_pages)[: rows * pages_per_row].reshape(rows, pages_per_row).astype(np.int32)
        runner.run(StepBatch(rng.integers(0, CFG.vocab_size, cu[-1]).astype(np.int32), cu,
                             np.asarray(context, np.int32), table))

    step([3, 5], [0, 0])  # 8 tokens, 2 rows, contexts within the smallest page bucket
    before = StepRunner.num_compilations()
    # Same buckets (tokens 3..8, rows 2, contexts <= MIN_CONTEXT): any composition reuses the compilation.
    for q_lens, context in (([8, 0], [0, 0]), ([2, 4], [3, 1]), ([1, 7], [0, MIN_CONTEXT - 7])):
        step(q_lens, context)
    assert StepRunner.num_compilations() == before
    # No more tokens than the row bucket (decode steps): tokens padded to the 2 rows, one compilation.
    for q_lens, context in (([1, 1], [4, 7]), ([0, 1], [3, 9]), ([2, 0], [5, 0])):
        step(q_lens, context)
    assert StepRunner.num_compilations() == before + 1
    # Rows 3 and 4 share the 4-row bucket (decode: 4 tokens); tokens 9..16 share the 16 bucket.
    for q_lens, context in (([1, 1, 1], [1, 5, 3]), ([1, 1, 1, 1], [0, 5, 6, 7])):
        step(q_lens, context)
    for q_lens, context in (([9, 1, 1], [0, 2, 3]), ([5, 5, 5, 1], [0, 0, 1, 3])):
        step(q_lens, context)
    assert StepRunner.num_compilations() == before + 3
    step([1, 1], [MIN_CONTEXT + 6, 3])  # a longer context: the next page bucket
    assert StepRunner.num_compilations() == before + 4


def test_bad_batches_are_refused(split_model):
    graphdef, state = split_model
    runner = StepRunner(graphdef, state, num_pages=8, page_size=PAGE, max_pages_per_seq=2)
    ok = dict(token_ids=np.asarray([1, 2, 3]), cu_q_lens=np.asarray([0, 2, 3]), context_lens=np.asarray([0, 4]),
              page_table=np.asarray([[0, 1], [2, 3]]))
    cases = {
        "cu_q_lens": dict(cu_q_lens=np.asarray([0, 3, 2])),
        "token ids": dict(token_ids=np.asarray([1, 2, CFG.vocab_size])),
        "more than its": dict(context_lens=np.asarray([0, 8])),
        "page ids in use": dict(page_table=np.asarray([[8, 0], [2, 3]])),
        "page_table must be": dict(page_table=np.zeros((2, 3), np.int32)),
        "input_embeddings": dict(input_embeddings=np.zeros((3, 5), np.float32), embedding_mask=np.ones(3, bool)),
        "one value per row": dict(temperature=np.ones(3, np.float32)),
        "num_logprobs": dict(num_logprobs=21),
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            runner.run(StepBatch(**{**ok, **change}))
    runner.run(StepBatch(**ok))  # the unchanged batch is fine
    with pytest.raises(ValueError):
        StepRunner(graphdef, state, num_pages=0, page_size=PAGE, max_pages_per_seq=2)


def test_page_bucket_has_two_widths_per_doubling():
    widths = [page_bucket(n, 4) for n in range(1, 50)]
    assert all(w >= max(n, 4) for n, w in zip(range(1, 50), widths))  # every row's pages fit
    assert sorted(set(widths)) == [4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert page_bucket(9, 4) == 12 and page_bucket(13, 4) == 16 and page_bucket(3, 8) == 8
