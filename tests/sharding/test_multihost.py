"""Two processes x 4 CPU devices with jax.distributed and gloo on loopback: a 2D sequence-parallel
training step (ring across the processes, Ulysses inside each) equals one device's."""

import sys
from pathlib import Path

import pytest

from two_processes import finish_two_processes, start_two_processes

from sharding.multihost import initialize_from_environment

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_match_one_device():
    procs = start_two_processes([sys.executable, str(ROOT / "tests/sharding/multihost_worker.py")],
                                pythonpath=[ROOT, ROOT / "tests"])
    logs = finish_two_processes(procs)
    for pid, log in enumerate(logs):
        assert f"process {pid}: loss" in log and "gradient shards match" in log, log[-2000:]


def test_environment_errors_are_clear():
    with pytest.raises(ValueError, match="JVILA_PROCESS_ID is not"):
        initialize_from_environment({"JVILA_COORDINATOR": "127.0.0.1:1", "JVILA_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="outside 0..1"):
        initialize_from_environment({"JVILA_COORDINATOR": "127.0.0.1:1", "JVILA_NUM_PROCESSES": "2",
                                     "JVILA_PROCESS_ID": "2"})
    assert initialize_from_environment({}) is False
