"""The TPU suite's own code, run on CPU with tiny shapes and the kernels in the TPU interpreter.

No TPU is available to this project; this keeps `benchmarks/tpu_suite.py` runnable at any commit
for those who have one. Four simulated devices, so the ring-attention step runs too.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL_CHECKS = 7  # flash fwd, flash fwd+bwd, paged, ragged, bgmv, sgmv, ring
TABLES = ("flash attention", "paged decode attention", "ragged paged attention", "batched LoRA",
          "ring attention forward over 4 devices")


def test_tpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "benchmarks/tpu_suite.py", "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    lines = log.splitlines()
    checks = [line for line in lines if line.startswith("[check]")]
    assert len(checks) >= KERNEL_CHECKS, "\n".join(checks)
    assert all(line.rstrip().endswith("PASS") for line in checks), "\n".join(checks)
    assert any(line.startswith("[check] ring") for line in checks)
    ours = [line for line in lines if line.startswith("[time] mosaic (ours)")]
    assert ours and all(line.endswith(" ms") for line in ours), "\n".join(ours)
    for table in TABLES:
        assert table in log, table
    saved = (tmp_path / "tpu_suite.log").read_text()  # stdout and stderr, as they came
    assert all(line in saved for line in proc.stdout.splitlines())
