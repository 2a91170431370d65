"""The GPU suite's own code, run on CPU with tiny shapes and the kernels in interpret mode.

Device time is scarce; this keeps `benchmarks/gpu_suite.sh` runnable at any commit.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_dry_run(tmp_path):
    # nvila_prefill, serve_throughput, multi_lora and train_mfu, the suite's other steps, have dry-run
    # tests of their own.
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path),
               STEPS="gpu_flash_attention gpu_paged_attention gpu_lora gpu_model")
    env.pop("XLA_FLAGS", None)  # one device is what the suite expects
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    checks = [line for line in log.splitlines() if line.startswith("[check]")]
    assert len(checks) >= 10 and all(line.rstrip().endswith("PASS") for line in checks), "\n".join(checks)
    for table in ("flash attention", "paged attention", "batched LoRA", "batched generation"):
        assert table in log, table
    assert (tmp_path / "gpu_suite.log").read_text() == proc.stdout
