"""Multi-host start-up: `jax.distributed` from the environment, before anything touches a device.

Explicit: JVILA_COORDINATOR (host:port of process 0), JVILA_NUM_PROCESSES and JVILA_PROCESS_ID;
optionally JVILA_LOCAL_DEVICE_IDS (comma-separated). Otherwise, on a cluster JAX recognises
(SLURM, Open MPI, TPU pods, GKE), `jax.distributed.initialize()` finds everything itself. On one
plain machine nothing is done. CPU processes exchange collectives through gloo (XLA's CPU client
has no other cross-process transport); the setting is ignored by GPU and TPU backends.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "JOBSET_NAME")


def initialize_from_environment(env=None) -> bool:
    """Start jax.distributed if the environment describes several processes; True if it did."""
    env = os.environ if env is None else env
    coordinator = env.get("JVILA_COORDINATOR")
    if coordinator:
        missing = [name for name in ("JVILA_NUM_PROCESSES", "JVILA_PROCESS_ID") if name not in env]
        if missing:
            raise ValueError(f"JVILA_COORDINATOR is set but {', '.join(missing)} is not: set all three")
        try:
            num_processes, process_id = int(env["JVILA_NUM_PROCESSES"]), int(env["JVILA_PROCESS_ID"])
        except ValueError as err:
            raise ValueError(f"JVILA_NUM_PROCESSES and JVILA_PROCESS_ID must be integers: {err}") from None
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JVILA_PROCESS_ID={process_id} is outside 0..{num_processes - 1}")
        local = env.get("JVILA_LOCAL_DEVICE_IDS")
        _use_cpu_collectives(env)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id,
                                   local_device_ids=[int(i) for i in local.split(",")] if local else None)
        return True
    if any(name in env for name in _CLUSTER_MARKERS):
        _use_cpu_collectives(env)
        jax.distributed.initialize()
        return True
    return False


def _use_cpu_collectives(env):
    jax.config.update("jax_cpu_collectives_implementation", env.get("JVILA_CPU_COLLECTIVES", "gloo"))
