"""One table from logical axis names to mesh axes, and the placement of arrays by it.

Model code names every parameter's axes ("embed", "mlp", "q_heads", ...). Which mesh axis each
name is split over is decided here alone: changing the parallelism layout means changing this
table or the mesh, never the model (MaxText's `logical_axis_rules`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Ordered: a logical name takes the listed mesh axes not yet used by an earlier dimension of the
# same array. None = replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    # Ring-major, all-to-all-minor: device (i, j) holds piece j of ring shard i (hybrid_attention).
    ("sequence", ("sequence", "sequence_a2a")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("norm", None),
    # LoRA adapters (jvila.models.lora): the matrix on the side of a projection that tensor
    # parallelism splits takes the base weight's name ("q_heads", "kv_heads", "mlp") and splits
    # with it; the adapter index, the rank and the hidden-size side stay whole, so A of a
    # column-parallel projection and B of a row-parallel one are replicated (S-LoRA's layout: the
    # base layer's own all-reduce also sums the adapter's partial products).
    ("lora_adapters", None),
    ("lora_rank", None),
    ("lora_embed", None),
)


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1, devices=None) -> Mesh:
    """A mesh over MESH_AXES; one size may be -1 to take the devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor, sequence]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into axes of sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    # Auto axes: XLA propagates shardings through the model, which carries no sharding code.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axis names on this mesh.

    A dimension that a mesh axis does not divide evenly stays replicated along it, so small models
    (e.g. 3 KV heads over 2-way tensor parallelism) still place.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = []
        for axis in table.get(name) or ():
            if axis in used or mesh.shape.get(axis, 1) == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]):
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Place every nnx parameter of `state` on the mesh according to its logical axis names."""
    from flax import nnx

    def place(var):
        names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
        spec = logical_to_spec(names, var.get_value().shape, mesh, rules)
        return var.replace(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
