"""LongVILA's balanced vision stage: frames split evenly over sequence ranks for the SigLIP tower
(equal to encoding all frames on one device), then spliced into the text and re-sharded evenly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jvila.models.siglip import SiglipVisionTower
from jvila.vision_config import SiglipConfig
from sharding.mesh import MeshConfig, build_mesh
from sharding.vision_balance import (
    encode_frames_balanced,
    frames_per_rank,
    splice_and_reshard,
)

TOWER = SiglipConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=16, patch_size=4)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; same arithmetic per frame, only placed elsewhere


def test_frames_per_rank_spreads_the_remainder():
    assert frames_per_rank(7, 4) == [2, 2, 2, 1]
    assert frames_per_rank(3, 4) == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="at least one frame"):
        frames_per_rank(0, 4)


def test_balanced_tower_and_resharded_sequence_match_one_device():
    graphdef, state = nnx.split(SiglipVisionTower(TOWER, rngs=nnx.Rngs(2)))
    rng = np.random.default_rng(1)
    frames = jnp.asarray(rng.standard_normal((7, 16, 16, 3)), jnp.float32)  # 7 frames over 4 ranks
    want = nnx.merge(graphdef, state)(frames, select_layer=-2)

    mesh = build_mesh(MeshConfig(fsdp=2, sequence=2, sequence_a2a=2))
    fn = jax.jit(lambda s, f: encode_frames_balanced(graphdef, s, f, mesh=mesh))
    # Each of the 4 sequence ranks runs the tower on 2 frames (7 padded to 8), not on all 7.
    jaxpr = str(jax.make_jaxpr(fn)(state, frames))
    assert "f32[2,16,16,3]" in jaxpr and "f32[7,16,16,3]" not in jaxpr.split("shard_map")[1]
    got = fn(state, frames)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)

    # Splice 2 frames' tokens into a 2-row text sequence and shard it evenly for the LLM.
    tokens_per_frame = want.shape[1]  # 16
    media = want[:2].reshape(-1, TOWER.hidden_size)  # 32 tokens
    text = jnp.asarray(rng.standard_normal((2, 40, TOWER.hidden_size)), jnp.float32)
    mask = np.zeros((2, 40), bool)
    mask[0, 3:3 + tokens_per_frame] = True
    mask[1, 20:20 + tokens_per_frame] = True
    spliced = jax.jit(lambda t, m: splice_and_reshard(t, m, jnp.asarray(mask), mesh=mesh))(text, media)
    even = NamedSharding(mesh, PartitionSpec(None, ("sequence", "sequence_a2a"), None))
    assert spliced.sharding.is_equivalent_to(even, 3)
    expected = np.asarray(text).copy()
    expected[mask] = np.asarray(media)
    np.testing.assert_array_equal(np.asarray(spliced), expected)
    with pytest.raises(ValueError, match="pad it to a multiple of 4"):
        splice_and_reshard(text[:, :38], media, jnp.asarray(mask[:, :38]), mesh=mesh)
