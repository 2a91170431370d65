"""Two local processes x 4 CPU devices joined by jax.distributed (gloo on loopback, a free port), for
the multi-host tests: the environment `sharding.multihost.initialize_from_environment` reads."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(command: list[str], *, pythonpath: list[Path], cwd: Path | None = None,
                        devices_each: int = 4) -> list[subprocess.Popen]:
    """`command` started twice as processes 0 and 1 of one run, output captured."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
                   JAX_PLATFORMS="cpu", JVILA_COORDINATOR=f"127.0.0.1:{port}", JVILA_NUM_PROCESSES="2",
                   JVILA_PROCESS_ID=str(pid), PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
        procs.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish_two_processes(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Each process's output once both have exited 0 (killed, and the test failed, otherwise)."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    return logs
