"""Meshes with sequence parallelism, built from a config, and the placement of what a step needs.

Axes, outermost first: data, fsdp, sequence (the ring), sequence_a2a (Ulysses), tensor. Adjacent
devices form the innermost axes, so tensor and the all-to-all axis — the two whose collectives
move the most, every layer — stay inside a node (one process / one slice), and only the ring's
point-to-point steps and the data/fsdp reductions cross the slower network (LongVILA's 2D layout).
`build_mesh` checks that this holds on a multi-host device list and says how to fix it if not.

Logical names map to these axes through `sharding.rules.DEFAULT_RULES`; `shard_params`,
`shard_like_params` (optimizer state) and `shard_batch` place arrays by it, and
`check_large_params_sharded` fails when a large parameter ended up whole on every device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding.rules import DEFAULT_RULES, logical_to_spec, shard_state

SP_MESH_AXES = ("data", "fsdp", "sequence", "sequence_a2a", "tensor")
RING_AXIS = "sequence"
A2A_AXIS = "sequence_a2a"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; one may be -1 to take the devices left over (fsdp by default)."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1  # ring sequence parallelism (across nodes)
    sequence_a2a: int = 1  # Ulysses all-to-all (inside a node)
    tensor: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        sizes = dict(zip(SP_MESH_AXES, (self.data, self.fsdp, self.sequence, self.sequence_a2a, self.tensor)))
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh axis {name!r} has size {size}; sizes are positive, or -1 for the rest")
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis size may be -1, got {free}")
        known = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh axes {sizes}")
            sizes[free[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
        return sizes


def node_ordered_devices(devices) -> list:
    """Devices grouped by node (process, then slice), in id order inside a node."""
    return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))


def build_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A mesh over SP_MESH_AXES, one host or many, with the all-to-all and tensor axes inside nodes."""
    devices = node_ordered_devices(devices if devices is not None else jax.devices())
    sizes = config.sizes(len(devices))
    per_node = _devices_per_node(devices)
    inner = sizes[A2A_AXIS] * sizes["tensor"]
    if per_node % inner and inner % per_node:
        raise ValueError(
            f"sequence_a2a x tensor = {inner} devices neither fit evenly in a node of {per_node} devices nor "
            f"span whole nodes: choose sizes whose product divides {per_node}, and put the rest of the sequence "
            "parallelism on the ring axis 'sequence'")
    if inner > per_node:
        raise ValueError(
            f"sequence_a2a x tensor = {inner} devices would span {inner // per_node} nodes of {per_node}: the "
            "all-to-all would cross the slow network; lower sequence_a2a and raise the ring axis 'sequence'")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, SP_MESH_AXES, axis_types=(AxisType.Auto,) * len(SP_MESH_AXES))


def _devices_per_node(devices) -> int:
    nodes: dict = {}
    for d in devices:
        key = (getattr(d, "slice_index", 0) or 0, d.process_index)
        nodes[key] = nodes.get(key, 0) + 1
    counts = set(nodes.values())
    if len(counts) != 1:
        raise ValueError(f"nodes hold different numbers of devices {sorted(counts)}; a mesh needs equal nodes")
    return counts.pop()


def shard_params(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Every nnx parameter placed by its logical axis names (see `sharding.rules.shard_state`)."""
    return shard_state(state, mesh, rules)


def shard_like_params(tree, params, mesh: Mesh):
    """Place an optimizer state: every subtree shaped like `params` (Adam's mu, nu, ...) is placed
    exactly as the params are; everything else (step counts, scalars) is replicated."""
    param_leaves, param_def = jax.tree.flatten(params)
    shardings = [leaf.sharding for leaf in param_leaves]

    def place(node):
        leaves, node_def = jax.tree.flatten(node)
        if node_def == param_def:
            return jax.tree.unflatten(node_def, [jax.device_put(x, s) for x, s in zip(leaves, shardings)])
        children = _children(node)
        if children is None:
            return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), node)
        return children(place)

    return place(tree)


def _children(node):
    """A function rebuilding `node` from its mapped children, or None for a leaf-like node."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return lambda fn: type(node)(*(fn(c) for c in node))
    if isinstance(node, (tuple, list)):
        return lambda fn: type(node)(fn(c) for c in node)
    if isinstance(node, dict):
        return lambda fn: {k: fn(v) for k, v in node.items()}
    return None


BATCH_NAMES = ("batch", "sequence")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """[batch, seq, ...] arrays placed with rows over data x fsdp and tokens over the sequence axes.

    Sequence lengths must divide the sequence shards: padding is the data pipeline's job, and a
    silent replication here would undo the point of sequence parallelism.
    """
    ways = mesh.shape.get(RING_AXIS, 1) * mesh.shape.get(A2A_AXIS, 1)
    placed = {}
    for name, value in batch.items():
        if value is None:
            placed[name] = None
            continue
        if value.ndim >= 2 and value.shape[1] % ways:
            raise ValueError(f"batch entry {name!r} has sequence length {value.shape[1]}, not divisible by the "
                             f"{ways} sequence shards of the mesh: pad it to a multiple of {ways}")
        names = BATCH_NAMES[: value.ndim] + (None,) * max(value.ndim - 2, 0)
        placed[name] = jax.device_put(value, NamedSharding(mesh, logical_to_spec(names, value.shape, mesh)))
    return placed


def check_large_params_sharded(state, mesh: Mesh, *, min_bytes: int = 1 << 20) -> None:
    """ValueError listing every parameter of at least `min_bytes` that is whole on every device of a
    mesh with fsdp or tensor parallelism (a logical name missing from the rules, or a shape the
    axes do not divide): such a parameter costs its full size on each device."""
    if mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1) == 1:
        return
    replicated = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        if value.nbytes >= min_bytes and getattr(value, "sharding", None) is not None \
                and value.sharding.is_fully_replicated:
            replicated.append(f"{jax.tree_util.keystr(path)} {value.shape} ({value.nbytes / 2**20:.1f} MiB)")
    if replicated:
        raise ValueError("large parameters are replicated on every device; give them logical axis names the "
                         "rule table shards, or shapes the fsdp/tensor axes divide: " + ", ".join(replicated))
