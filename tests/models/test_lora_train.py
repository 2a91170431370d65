"""Training an adapter alone: its gradients through the functional core, dropout, and the optax loop."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lora_fixtures import random_adapter

from jvila.checkpoints.peft_adapter import load_peft, save_peft
from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.llm import LLM
from jvila.models.lora import LoraConfig, LoraWeights, merge, stack_adapters
from jvila.models.lora_train import train_lora

CFG = LLMConfig(vocab_size=61, hidden_size=40, intermediate_size=56, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=10)


def setup(seed):
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(LLM(CFG, rngs=nnx.Rngs(seed)))
    # Weights ~N(0, 0.1²) instead of the 0.02 init: logits wide enough that a small adapter can fit a sequence.
    state = jax.tree.map(lambda x: 5.0 * x, state)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 9)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    weights = jnp.asarray(rng.random((3, 9)) > 0.2, jnp.float32)
    return rng, graphdef, state, tokens, targets, weights


def test_adapter_gradients_follow_the_chain_rule_through_the_merged_weight():
    seed = int(np.random.default_rng().integers(1 << 20))
    rng, graphdef, state, tokens, targets, weights = setup(seed)
    adapter = random_adapter(CFG, 6, ("q_proj", "o_proj", "down_proj"), rng, alpha=9.0)
    lora = stack_adapters([adapter], max_rank=6)

    grads = jax.jit(jax.grad(lambda lw: functional.loss(graphdef, state, tokens, targets, weights,
                                                        attention=dense_attention, lora=lw)))(lora)
    # The adapted model is the merged one, so dL/dA = s dL/dW Bᵀ and dL/dB = s Aᵀ dL/dW with W flat [in, out].
    merged = merge(graphdef, state, adapter)
    base_grads = jax.jit(jax.grad(lambda st: functional.loss(graphdef, st, tokens, targets, weights,
                                                             attention=dense_attention)))(merged)
    scale = adapter.config.scale
    for layer in range(CFG.num_layers):
        for module, block in (("q_proj", "attn"), ("o_proj", "attn"), ("down_proj", "mlp")):
            a, b = (np.asarray(x, np.float64) for x in adapter.weights[layer][module])
            dw = np.asarray(base_grads["layers"][layer][block][module].get_value(), np.float64).reshape(a.shape[0], -1)
            got = grads.layers[layer][module]
            # float32 backward passes through two different graphs: rounding only (seen ~1e-5 of the largest).
            for value, want in ((got.a[0], scale * dw @ b.T), (got.b[0], scale * a.T @ dw)):
                assert np.abs(np.asarray(value) - want).max() < 1e-4 * np.abs(want).max(), (layer, module)


def test_dropout_only_with_a_key():
    rng, graphdef, state, tokens, targets, weights = setup(1)
    lora = stack_adapters([random_adapter(CFG, 4, ("v_proj", "up_proj"), rng)], max_rank=4)

    def loss(**kw):
        return float(functional.loss(graphdef, state, tokens, targets, weights, attention=dense_attention,
                                     lora=lora, **kw))

    plain = loss()
    assert loss(lora_dropout=0.5) == plain  # no key: inference, no dropout
    dropped = loss(lora_dropout=0.5, dropout_key=jax.random.key(3))
    assert dropped != plain
    assert loss(lora_dropout=0.5, dropout_key=jax.random.key(3)) == dropped  # the key decides the mask


def test_train_lora_fits_a_sequence_with_the_base_frozen(tmp_path):
    _, graphdef, state, tokens, targets, weights = setup(int(np.random.default_rng().integers(1 << 20)))
    before = [np.asarray(x) for x in jax.tree.leaves(state)]
    config = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "gate_proj"), dropout=0.05)
    batches = [(tokens, targets, weights)] * 40
    adapter, losses = train_lora(graphdef, state, config, batches, learning_rate=2e-2, key=jax.random.key(0))

    base_loss = float(functional.loss(graphdef, state, tokens, targets, weights, attention=dense_attention))
    # PEFT's init (B = 0) starts at the base model; dropout does not change a zero delta.
    np.testing.assert_allclose(losses[0], base_loss, rtol=1e-5)
    trained = float(functional.loss(graphdef, state, tokens, targets, weights, attention=dense_attention,
                                    lora=stack_adapters([adapter], max_rank=4)))
    # 40 Adam steps on one batch memorise most of it (seen: 8.6 → 0.06); the base model cannot.
    assert trained < 0.25 * base_loss, (base_loss, trained, losses[::10])
    for old, new in zip(before, jax.tree.leaves(state)):
        np.testing.assert_array_equal(old, np.asarray(new))  # the base never moved
    assert adapter.config == config and set(adapter.weights) == {0, 1}

    save_peft(adapter, tmp_path / "trained", base_model_name="tiny")
    reloaded = stack_adapters([load_peft(tmp_path / "trained", CFG)], max_rank=8)
    again = float(functional.loss(graphdef, state, tokens, targets, weights, attention=dense_attention,
                                  lora=reloaded))
    np.testing.assert_allclose(again, trained, rtol=1e-6)
    assert isinstance(reloaded, LoraWeights) and reloaded.max_rank == 8
