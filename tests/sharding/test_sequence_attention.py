"""Ring, Ulysses and 2D sequence-parallel attention on simulated devices equal dense attention,
forward and backward, causal or not, GQA and MQA, with packed segments, contiguous and zigzag."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from pallas_kernels.flash_attention import flash_attention_reference
from sharding.hybrid_attention import hybrid_attention, sequence_parallel_attention
from sharding.lightseq_attention import lightseq_attention
from sharding.load_balance import from_zigzag, to_zigzag, zigzag_order
from sharding.ring_attention import ring_attention
from sharding.ulysses_attention import ulysses_attention

# float32 everywhere; the sharded paths differ from one dense softmax only in summation order
# (partials merged by lse): ~1e-6 observed, 1e-5 leaves room without hiding a wrong mask (O(0.1)).
TOL = dict(rtol=1e-5, atol=1e-5)


def mesh_of(ring, a2a):
    return jax.make_mesh((ring, a2a), ("sequence", "sequence_a2a"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[: ring * a2a])


def random_inputs(seed, *, seq, q_heads, kv_heads, segments, batch=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q, ct = (rng.standard_normal((batch, seq, q_heads, head_dim)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(0, 3, (batch, seq)), axis=1).astype(np.int32) if segments else None
    return q, k, v, seg, ct


def sharded_attention(strategy, mesh, layout, causal):
    ring, a2a = mesh.shape["sequence"], mesh.shape["sequence_a2a"]
    spec = PartitionSpec(None, ("sequence", "sequence_a2a"), None, None)
    seg_spec = PartitionSpec(None, ("sequence", "sequence_a2a"))

    def local(q, k, v, seg):
        if strategy == "ring":
            return ring_attention(q, k, v, axis_name="sequence", causal=causal, segment_ids=seg, layout=layout)[0]
        if strategy == "lightseq":
            return lightseq_attention(q, k, v, axis_name="sequence", segment_ids=seg)[0]
        if strategy == "ulysses":
            return ulysses_attention(q, k, v, axis_name="sequence_a2a", causal=causal, segment_ids=seg)
        return hybrid_attention(q, k, v, ring_axis="sequence", a2a_axis="sequence_a2a", causal=causal,
                                segment_ids=seg, layout=layout)

    def attend(q, k, v, seg):
        # The batch is permuted once, outside; the result is put back in order for the comparison.
        perm = (lambda x: to_zigzag(x, ring, shard_multiple=a2a)) if layout == "zigzag" else (lambda x: x)
        q, k, v = perm(q), perm(k), perm(v)
        seg = None if seg is None else perm(seg)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, None if seg is None else seg_spec),
                            out_specs=spec, check_vma=False)(q, k, v, seg)
        return from_zigzag(out, ring, shard_multiple=a2a) if layout == "zigzag" else out

    return attend


def dense(q, k, v, seg, causal):
    return flash_attention_reference(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)[0]


CASES = [
    # strategy, (ring, a2a), layout, causal, (q_heads, kv_heads), segments, seq
    ("ring", (4, 1), "contiguous", True, (4, 2), True, 20),
    ("ring", (4, 1), "zigzag", True, (4, 1), True, 24),
    ("ring", (2, 1), "contiguous", False, (3, 1), False, 14),
    ("ulysses", (1, 4), "contiguous", True, (8, 2), True, 20),
    ("ulysses", (1, 4), "contiguous", False, (4, 1), False, 12),
    ("lightseq", (4, 1), "contiguous", True, (4, 2), True, 20),
    ("lightseq", (2, 1), "contiguous", True, (2, 1), False, 10),
    ("hybrid", (2, 2), "zigzag", True, (4, 2), True, 24),
    ("hybrid", (2, 4), "contiguous", False, (4, 1), True, 24),
]


@pytest.mark.parametrize("strategy,shape,layout,causal,heads,segments,seq", CASES)
def test_equals_dense_forward_and_backward(strategy, shape, layout, causal, heads, segments, seq):
    q, k, v, seg, ct = random_inputs(hash((strategy, shape, layout)) % 2**31, seq=seq, q_heads=heads[0],
                                     kv_heads=heads[1], segments=segments)
    attend = sharded_attention(strategy, mesh_of(*shape), layout, causal)

    def with_grads(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return (out, *vjp(jnp.asarray(ct)))

    got = jax.jit(lambda q, k, v: with_grads(attend))(q, k, v)
    want = with_grads(lambda q, k, v, seg: dense(q, k, v, seg, causal))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **TOL)


def test_zigzag_order_is_balanced_permutation():
    order = zigzag_order(16, 4)
    assert sorted(order) == list(range(16))
    # Device r holds chunks r and 7 - r (chunk length 2): every device owns the same causal work.
    work = [sum(i + 1 for i in order[4 * r: 4 * r + 4]) for r in range(4)]
    assert len(set(work)) == 1
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 3)))
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)
    with pytest.raises(ValueError, match="divisible by 8"):
        zigzag_order(12, 4)


def test_head_count_that_cannot_split_names_the_fix():
    q, k, v, _, _ = random_inputs(0, seq=8, q_heads=6, kv_heads=3, segments=False)
    attend = sharded_attention("ulysses", mesh_of(1, 4), "contiguous", True)
    with pytest.raises(ValueError, match="6 query heads.*ring axis 'sequence'"):
        attend(q, k, v, None)
    with pytest.raises(ValueError, match="unknown sequence layout 'striped'"):
        sequence_parallel_attention(q, k, v, None, mesh=mesh_of(2, 1), rows=None, heads=None, layout="striped")


def test_tpu_implementation_takes_the_fused_ring_kernel():
    # The fused Mosaic ring (checked against the reference in tests/pallas_kernels) replaces the
    # ppermute ring in the forward when shards are contiguous and unsegmented.
    from sharding.hybrid_attention import ring_stage

    q, k, v, seg, _ = random_inputs(0, seq=16, q_heads=2, kv_heads=1, segments=True)
    mesh, spec = mesh_of(2, 1), PartitionSpec(None, "sequence", None, None)

    def jaxpr(seg, implementation):
        def local(q, k, v, seg):
            return ring_stage(q, k, v, axis_name="sequence", causal=True, segment_ids=seg, layout="contiguous",
                              implementation=implementation)[0]
        seg_spec = None if seg is None else PartitionSpec(None, "sequence")
        fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
        return str(jax.make_jaxpr(fn)(q, k, v, seg))

    fused = jaxpr(None, "pallas_tpu_interpret")
    assert "pallas_call" in fused and "ppermute" not in fused
    assert "ppermute" in jaxpr(seg, "pallas_tpu_interpret")  # segment ids: the general ring
