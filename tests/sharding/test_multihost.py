"""Two processes x 4 CPU devices with jax.distributed and gloo on loopback: a 2D sequence-parallel
training step (ring across the processes, Ulysses inside each) equals one device's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sharding.multihost import initialize_from_environment

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device():
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JVILA_COORDINATOR=f"127.0.0.1:{port}", JVILA_NUM_PROCESSES="2", JVILA_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests/sharding/multihost_worker.py")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, log[-4000:]
        assert f"process {pid}: loss" in log and "gradient shards match" in log, log[-2000:]


def test_environment_errors_are_clear():
    with pytest.raises(ValueError, match="JVILA_PROCESS_ID is not"):
        initialize_from_environment({"JVILA_COORDINATOR": "127.0.0.1:1", "JVILA_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="outside 0..1"):
        initialize_from_environment({"JVILA_COORDINATOR": "127.0.0.1:1", "JVILA_NUM_PROCESSES": "2",
                                     "JVILA_PROCESS_ID": "2"})
    assert initialize_from_environment({}) is False
