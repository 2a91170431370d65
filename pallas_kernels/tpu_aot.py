"""Compile for a TPU from a host without one: libtpu's deviceless ahead-of-time compiler.

jax can describe a TPU slice it is not attached to (`jax.experimental.topologies`), and
`jit(...).lower(...).compile()` against devices of that description runs libtpu's own
compiler -- the XLA TPU pipeline and, for Pallas kernels, the Mosaic compiler with its
layout inference and tiling checks. Nothing executes, so this proves that a kernel builds for
a TPU generation (the step where Mosaic kernels usually break), not that it is fast or right;
numerics are the TPU interpreter's job (`pltpu.InterpretParams`) in the kernel tests.

Needs only the `libtpu` wheel matching the installed jaxlib, importable (e.g. on PYTHONPATH);
`python -m pallas_kernels.tpu_aot --requirement` prints that pin. Run with JAX_PLATFORMS=cpu
so jax does not look for a local TPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Slices with one host's chips; libtpu rejects anything smaller than a host.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def libtpu_requirement() -> str:
    """The `libtpu==...` pin of the installed jax's `tpu` extra (libtpu must match jaxlib)."""
    for requirement in importlib.metadata.requires("jax") or ():
        spec, _, marker = requirement.partition(";")
        if spec.strip().startswith("libtpu") and "tpu" in marker:
            return spec.strip().replace(" ", "")
    raise RuntimeError("the installed jax declares no libtpu requirement for its tpu extra")


def tpu_devices(generation: str):
    """One device per chip of a one-host slice of `generation` (a key of TOPOLOGIES).

    v4 and v5p describe both TensorCores of a chip, but jax runs them as one "megacore"
    device, and only the first core of each chip may enter a mesh.
    """
    if generation not in TOPOLOGIES:
        raise ValueError(f"unknown TPU generation {generation!r}; expected one of {sorted(TOPOLOGIES)}")
    # libtpu takes a host-wide lock file, as if it owned the chips; only compiling here, any
    # number of processes may share it (set before libtpu first loads, i.e. here).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[generation]).devices
    return [device for device in devices if getattr(device, "core_on_chip", 0) == 0]


def tpu_mesh(generation: str, shape=(1,), axis_names=("x",)) -> Mesh:
    """A mesh over the first prod(shape) chips of a `generation` slice."""
    devices = tpu_devices(generation)[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), axis_names)


def compile_for_tpu(fn, *args, mesh: Mesh, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs).lower(*args).compile()` for the TPU chips of `mesh`.

    `args` are pytrees of `jax.ShapeDtypeStruct`; leaves without a sharding are replicated
    over `mesh`. Lowering happens with `mesh` set, so Mosaic's lowering rules that ask for the
    chip generation read it from the mesh's devices rather than from the local CPU.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if getattr(leaf, "sharding", None) is not None:
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    args = jax.tree.map(place, args)
    with jax.set_mesh(mesh):
        return jax.jit(fn, **jit_kwargs).lower(*args).compile()


if __name__ == "__main__":
    if sys.argv[1:] != ["--requirement"]:
        sys.exit("usage: python -m pallas_kernels.tpu_aot --requirement")
    print(libtpu_requirement())
