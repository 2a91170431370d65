"""Media enter generation as input embeddings: spliced prompts decode as a cache-free reference does."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jvila import generate as gen
from jvila.config import LLMConfig
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.llm import LLM

CFG = LLMConfig(vocab_size=89, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(LLM(CFG, rngs=nnx.Rngs(5)))


def greedy_reference(graphdef, state, prompt, embeddings, mask, steps):
    """Greedy decoding by re-running the whole cache-free forward for every new token."""
    model = nnx.merge(graphdef, state)
    sequence = np.where(mask[:, None], embeddings, np.asarray(model.embed_tokens(jnp.asarray(prompt))))
    out = []
    for _ in range(steps):
        hidden = functional.hidden_states(graphdef, state, jnp.zeros((1, len(sequence)), jnp.int32),
                                          attention=dense_attention, input_embeddings=jnp.asarray(sequence)[None])
        token = int(jnp.argmax(model.logits(hidden[0, -1])))
        out.append(token)
        sequence = np.concatenate([sequence, np.asarray(model.embed_tokens(jnp.asarray([token])))])
    return out


def test_spliced_embeddings_generate_as_the_reference(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (11, 19)]
    # Row 0 carries a media block at positions 3..8 (its ids stay valid placeholders); row 1 is text.
    media = rng.normal(0, 0.5, (11, CFG.hidden_size)).astype(np.float32)
    mask = np.zeros(11, bool)
    mask[3:9] = True
    got = gen.generate(graphdef, state, prompts, max_new_tokens=6, input_embeddings=[media, None],
                       embedding_masks=[mask, None])
    assert got[0] == greedy_reference(graphdef, state, prompts[0], media, mask, 6)
    assert got[1] == gen.generate(graphdef, state, [prompts[1]], max_new_tokens=6)[0]
    # The media block really is used: the placeholders' own embeddings give another answer.
    assert got[0] != gen.generate(graphdef, state, [prompts[0]], max_new_tokens=6)[0]


def test_a_full_mask_is_the_default(split_model):
    graphdef, state = split_model
    rng = np.random.default_rng()
    prompt = list(rng.integers(0, CFG.vocab_size, 7))
    embeds = rng.normal(0, 0.5, (7, CFG.hidden_size)).astype(np.float32)
    assert gen.generate(graphdef, state, [prompt], max_new_tokens=4, input_embeddings=[embeds]) == gen.generate(
        graphdef, state, [prompt], max_new_tokens=4, input_embeddings=[embeds], embedding_masks=[np.ones(7, bool)])


@pytest.mark.parametrize("kwargs,match", [
    ({"input_embeddings": [np.zeros((4, CFG.hidden_size))]}, "shape"),
    ({"input_embeddings": [np.zeros((5, CFG.hidden_size + 1))]}, "shape"),
    ({"input_embeddings": [None, None]}, "entries"),
    ({"input_embeddings": [np.zeros((5, CFG.hidden_size))], "embedding_masks": [np.ones(4, bool)]}, "embedding_masks"),
    ({"embedding_masks": [np.ones(5, bool)]}, "without input_embeddings"),
])
def test_bad_embeddings(split_model, kwargs, match):
    graphdef, state = split_model
    with pytest.raises(ValueError, match=match):
        gen.generate(graphdef, state, [[1, 2, 3, 4, 5]], max_new_tokens=2, **kwargs)
