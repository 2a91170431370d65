"""LightSeq's remat policy: gradients unchanged, and the backward never repeats the ring's forward
(its transfers and exponentials counted in the gradient program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from sharding.remat import rematerialized
from sharding.ring_attention import ring_attention

RING = 4
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the same arithmetic, recomputed or not


def layer_loss(params, x, ct):
    """One attention block: projections, ring attention over 'sequence', output projection."""
    def attend(q, k, v):
        return ring_attention(q, k, v, axis_name="sequence", causal=True, implementation="reference")[0]

    mesh = jax.make_mesh((RING,), ("sequence",), axis_types=(AxisType.Auto,), devices=jax.devices()[:RING])
    spec = PartitionSpec(None, "sequence", None, None)
    q, k, v = (jnp.einsum("bte,ehd->bthd", jnp.tanh(x), params[name]) for name in ("q", "k", "v"))
    out = jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
    return jnp.sum(jnp.tanh(jnp.einsum("bthd,hde->bte", out, params["o"])) * ct)


def gradient_and_ring_work(policy, params, x, ct):
    """The gradient, and the ring's ppermutes and exps (one per attention block) in its program.

    Counted in the jaxpr, before XLA's CSE can merge a recomputed forward's transfers with the
    backward's own rotations of the same K/V.
    """
    grad = jax.grad(rematerialized(layer_loss, policy))
    jaxpr = str(jax.make_jaxpr(grad)(params, x, ct))
    return jax.jit(grad)(params, x, ct), (jaxpr.count("ppermute["), jaxpr.count(" exp "))


def test_lightseq_policy_keeps_attention_output():
    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(rng.standard_normal((16, 2, 8)) * 0.3, jnp.float32) for name in "qkv"}
    params["o"] = jnp.asarray(rng.standard_normal((2, 8, 16)) * 0.3, jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 24, 16)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((1, 24, 16)), jnp.float32)
    results = {policy: gradient_and_ring_work(policy, params, x, ct) for policy in ("none", "full", "lightseq")}
    permutes, exps = results["none"][1]
    # Forward: K, V move n-1 times; backward: K, V n-1 times again and dK, dV n times.
    assert permutes == 2 * (RING - 1) + 2 * (RING - 1) + 2 * RING
    full_permutes, full_exps = results["full"][1]
    assert full_permutes == permutes + 2 * (RING - 1) and full_exps > exps  # the ring's forward again
    assert results["lightseq"][1] == (permutes, exps)  # LightSeq: nothing of the attention recomputed
    for policy in ("full", "lightseq"):
        for name in params:
            np.testing.assert_allclose(results[policy][0][name], results["none"][0][name], **TOL)
    with pytest.raises(ValueError, match="unknown remat policy"):
        rematerialized(layer_loss, "some")
