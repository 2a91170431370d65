"""Many adapters in one batch through the functional core equal each adapter merged into the base weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_fixtures import greedy_packed, random_adapter

from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.kv_cache import contiguous_cache
from jvila.models.llm import LLM
from jvila.models.lora import (
    TARGET_MODULES,
    AdapterError,
    dense_lora,
    empty_slots,
    merge,
    packed_context,
    padded_batch_context,
    set_slot,
    stack_adapters,
    unmerge,
)
from pallas_kernels.lora import bgmv_reference, sgmv_reference

# Sizes that divide nothing in particular; q/k/v biases and an o bias so the adapters sit beside them.
CFG = LLMConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=12, qkv_bias=True, out_bias=True)
RANKS = (8, 16, 24, 32, 40, 48, 56, 64)
# Every adapter a different subset of modules (all, attention only, MLP only, single modules).
MODULE_SETS = (TARGET_MODULES, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ("o_proj",),
               ("k_proj", "down_proj"), TARGET_MODULES, ("q_proj", "k_proj", "v_proj", "o_proj"), ("up_proj",))
NEW_TOKENS = 6
PAD_TOKENS = 160  # packed prefill width: more tokens than rows, so the prefill takes the sgmv path

extend_packed = jax.jit(functional.extend_packed, static_argnames=("graphdef", "attention"))
logits = jax.jit(functional.logits, static_argnames=("graphdef", "attention"))
extend = jax.jit(functional.extend, static_argnames=("graphdef", "attention"))
decode_step = jax.jit(functional.decode_step, static_argnames=("graphdef", "attention"))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng()
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    adapters = [random_adapter(CFG, r, mods, rng, alpha=float(r), std=0.5 / np.sqrt(r))
                for r, mods in zip(RANKS, MODULE_SETS)]
    return graphdef, state, adapters, rng


def greedy(graphdef, state, prompts, lora=None, row_adapters=None):
    return greedy_packed(extend_packed, graphdef, state, CFG, prompts, NEW_TOKENS, PAD_TOKENS, lora, row_adapters)


def test_eight_adapters_in_one_batch_match_merged_models(setup):
    graphdef, state, adapters, rng = setup
    lora = stack_adapters(adapters, max_rank=64, base_config=CFG)
    # Ten rows: the eight adapters in shuffled order, the base model (-1), and one adapter twice.
    row_adapters = np.concatenate([rng.permutation(8), [-1, 3]]).astype(np.int32)
    prompts = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in rng.integers(3, 15, len(row_adapters))]
    got_tokens, got_logits = greedy(graphdef, state, prompts, lora, row_adapters)

    base_tokens = None
    for which in range(-1, 8):
        merged = state if which < 0 else merge(graphdef, state, adapters[which])
        want_tokens, want_logits = greedy(graphdef, merged, prompts)
        if which < 0:
            base_tokens = want_tokens
        for row in np.flatnonzero(row_adapters == which):
            np.testing.assert_array_equal(got_tokens[row], want_tokens[row], err_msg=f"row {row}, adapter {which}")
            # Same float32 math grouped differently (x@A@B beside W versus x@(W + AB)): rounding only.
            err = np.abs(got_logits[row] - want_logits[row]).max() / np.abs(want_logits[row]).max()
            assert err < 1e-4, (row, which, err)
    # The adapters matter: most adapted rows decode differently from the base model.
    differs = [(got_tokens[r] != base_tokens[r]).any() for r in range(10) if row_adapters[r] >= 0]
    assert sum(differs) >= 6, differs


@functools.partial(jax.jit, static_argnames=("graphdef", "per_token", "implementation"))
def hidden_with(graphdef, state, lora, tokens, rows, *, per_token, implementation):
    """The decoder with adapters per row: as segments (sgmv) or repeated per token (bgmv)."""
    model = nnx.merge(graphdef, state)
    adapters = jnp.repeat(rows[:, None], tokens.shape[1], axis=1) if per_token else rows
    context = padded_batch_context(lora, adapters, *tokens.shape, implementation=implementation)
    assert (context.segment_starts is None) == per_token
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = model(model.embed_tokens(tokens), positions=positions, attention=dense_attention, lora=context)
    return hidden


def test_kernel_paths_agree_with_the_dense_path_and_base_rows_are_untouched(setup):
    graphdef, state, adapters, rng = setup
    lora = stack_adapters(adapters[:3], max_rank=24, base_config=CFG)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 13)), jnp.int32)
    rows = jnp.asarray([2, -1, 0, 1], jnp.int32)
    dense = hidden_with(graphdef, state, lora, tokens, rows, per_token=True, implementation="dense")
    # sgmv, bgmv: the kernels' reference paths; and CPU's own: the segments' adapters only, a per-token gather.
    for per_token, implementation in ((False, "reference"), (True, "reference"), (False, "segment_dense"),
                                      (True, "gather")):
        kernel = hidden_with(graphdef, state, lora, tokens, rows, per_token=per_token, implementation=implementation)
        # The same float32 products summed in another order: rounding only.
        np.testing.assert_allclose(np.asarray(kernel), np.asarray(dense), rtol=1e-5, atol=1e-5)
    got = logits(graphdef, state, tokens, attention=dense_attention, lora=lora, token_adapters=rows)
    base = logits(graphdef, state, tokens, attention=dense_attention)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(base[1]))
    assert np.abs(np.asarray(got[0]) - np.asarray(base[0])).max() > 1e-2
    # One adapter alone: no indices needed.
    single = stack_adapters([adapters[2]], max_rank=24)
    alone = logits(graphdef, state, tokens, attention=dense_attention, lora=single)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(got[0]), rtol=1e-5, atol=1e-5)


def test_padded_extend_and_decode_step_take_per_row_adapters(setup):
    graphdef, state, adapters, rng = setup
    lora = stack_adapters(adapters[:2], max_rank=16, base_config=CFG)
    rows = jnp.asarray([1, -1, 0], jnp.int32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 9)), jnp.int32)
    num_new = jnp.asarray([9, 4, 7], jnp.int32)
    nxt = jnp.asarray(rng.integers(0, CFG.vocab_size, 3), jnp.int32)

    def run(state, **kw):
        first, cache = extend(graphdef, state, tokens, num_new, contiguous_cache(CFG, 3, 16, page_size=8),
                              attention=dense_attention, **kw)
        second, _ = decode_step(graphdef, state, nxt, cache, attention=dense_attention, **kw)
        return np.asarray(first), np.asarray(second)

    got = run(state, lora=lora, token_adapters=rows)
    for row, which in enumerate(rows.tolist()):
        want = run(state if which < 0 else merge(graphdef, state, adapters[which]))
        for g, w in zip(got, want):
            # x@A@B beside W against x@(W + AB): float32 rounding only.
            assert np.abs(g[row] - w[row]).max() < 1e-4 * np.abs(w[row]).max(), (row, which)


def test_packed_rows_become_sgmv_segments(setup):
    _, _, adapters, rng = setup
    lora = stack_adapters(adapters[:4], max_rank=32)
    cu = jnp.asarray([0, 5, 5, 6, 14], jnp.int32)  # an empty row, a one-token row, then padding to 17
    per_token = jnp.asarray([3] * 5 + [-1] + [1] * 8 + [0, 2, 3], jnp.int32)
    context = packed_context(lora, per_token, cu, 17)
    np.testing.assert_array_equal(np.asarray(context.segment_starts), np.asarray(cu))
    assert np.asarray(context.segment_adapters)[[0, 2, 3]].tolist() == [3, -1, 1]
    assert packed_context(lora, per_token[:4], jnp.asarray([0, 1, 2, 3, 4], jnp.int32), 4).segment_starts is None
    m = lora.layers[0]["q_proj"]
    x = jnp.asarray(rng.standard_normal((17, m.a.shape[1])), jnp.float32)
    y = jnp.asarray(rng.standard_normal((17, m.b.shape[2])), jnp.float32)
    segments = sgmv_reference(y, x, m.a, m.b, context.segment_starts, context.segment_adapters, lora.scales)
    # Past cu_q_lens[-1] the segments leave y alone; up to there they equal the per-token form.
    tokens = bgmv_reference(y, x, m.a, m.b, jnp.where(jnp.arange(17) < 14, per_token, -1), lora.scales)
    np.testing.assert_allclose(np.asarray(segments), np.asarray(tokens), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dense_lora(y, x, m.a, m.b, per_token, lora.scales))[:14],
                               np.asarray(tokens)[:14], rtol=1e-5, atol=1e-4)


def test_merge_then_unmerge_restores_the_base(setup):
    graphdef, state, adapters, _ = setup
    adapter = adapters[0]  # every module
    merged = merge(graphdef, state, adapter)
    restored = unmerge(graphdef, merged, adapter)
    flat = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(merged):
        before, after = np.asarray(flat[path].get_value()), np.asarray(var.get_value())
        targeted = path[0] == "layers" and path[-1] in TARGET_MODULES
        assert (np.abs(after - before).max() > 1e-3) == targeted, path
    for path, var in nnx.to_flat_state(restored):
        # Adding then subtracting the same float32 delta: a few ulps of the weights (~0.02) at most.
        np.testing.assert_allclose(np.asarray(var.get_value()), np.asarray(flat[path].get_value()), atol=1e-7)
    # The merged weight is W + scale * A @ B in the decoder's [in, heads, d] layout.
    a, b = adapter.weights[1]["q_proj"]
    want = np.asarray(flat[("layers", 1, "attn", "q_proj")].get_value()) + (
        adapter.config.scale * (a.astype(np.float64) @ b)).reshape(CFG.hidden_size, CFG.num_heads, CFG.head_dim)
    np.testing.assert_allclose(np.asarray(merged["layers"][1]["attn"]["q_proj"].get_value()), want, atol=1e-6)


def test_bad_adapters_and_indices_are_refused(setup):
    graphdef, state, adapters, rng = setup
    with pytest.raises(AdapterError, match="adapter 4 has rank 40, above the maximum rank 32"):
        stack_adapters(adapters, max_rank=32)
    wrong_cfg = CFG.__class__(**{**CFG.__dict__, "hidden_size": 40})
    wrong = random_adapter(wrong_cfg, 8, ("q_proj",), rng)
    with pytest.raises(AdapterError, match="do not fit the base model"):
        stack_adapters([wrong], max_rank=8, base_config=CFG)
    with pytest.raises(AdapterError, match="do not fit the base model"):
        merge(graphdef, state, wrong)
    with pytest.raises(AdapterError, match=r"adapter 0 has weights for \['o_proj'\], outside the stacked modules"):
        stack_adapters([adapters[3]], max_rank=64, target_modules=("q_proj",))
    with pytest.raises(AdapterError, match="do not fit"):  # no base config: the adapters must agree with each other
        stack_adapters([adapters[3], random_adapter(wrong_cfg, 8, ("o_proj",), rng)], max_rank=64)
    with pytest.raises(AdapterError, match="unknown LoRA target modules"):
        random_adapter(CFG, 8, ("q_proj", "embed_tokens"), rng)
    lora = stack_adapters(adapters[:2], max_rank=16)
    tokens = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="token_adapters must say"):
        functional.logits(graphdef, state, tokens, attention=dense_attention, lora=lora)
    with pytest.raises(ValueError, match=r"must be \[batch\] or \[batch, seq\]"):
        functional.logits(graphdef, state, tokens, attention=dense_attention, lora=lora,
                          token_adapters=jnp.zeros((3,), jnp.int32))


def test_slots_filled_one_by_one_equal_the_stack(setup):
    _, _, adapters, rng = setup
    # An adapter on one layer only (PEFT's layers_to_transform) leaves the other layer's slot zero.
    partial = random_adapter(CFG, 8, ("q_proj", "up_proj"), rng, layers=[1])
    chosen = [adapters[3], partial, adapters[0]]
    want = stack_adapters(chosen, max_rank=32, base_config=CFG, target_modules=TARGET_MODULES)
    slots = empty_slots(CFG, 3, 32)
    for slot in (2, 0, 1):
        slots = set_slot(slots, slot, chosen[slot])
    for got_leaf, want_leaf in zip(jax.tree.leaves(slots), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
    assert not np.asarray(slots.layers[0]["q_proj"].a[1]).any() and np.asarray(slots.layers[1]["q_proj"].a[1]).any()
    # Overwriting a slot with a smaller adapter clears what the old one left beyond its rank and modules.
    slots = set_slot(slots, 0, partial)
    np.testing.assert_array_equal(np.asarray(slots.layers[1]["down_proj"].b[0]), 0)
    np.testing.assert_array_equal(np.asarray(slots.layers[1]["q_proj"].a[0]), np.asarray(slots.layers[1]["q_proj"].a[1]))
    with pytest.raises(AdapterError, match="above the maximum rank 32"):
        set_slot(slots, 0, adapters[-1])
    with pytest.raises(AdapterError, match="outside the 3 slots"):
        set_slot(slots, 3, partial)
