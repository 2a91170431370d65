"""benchmarks/nvila_prefill.py's own code on CPU with the smallest shapes, so it stays runnable at any commit."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_nvila_prefill_dry_run():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, as the benchmark runs
    proc = subprocess.run([sys.executable, "benchmarks/nvila_prefill.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    lines = log.splitlines()
    checks = [line for line in lines if line.startswith("[check]")]
    assert len(checks) == 6 and all(line.rstrip().endswith("PASS") for line in checks), "\n".join(checks)
    header = next(i for i, line in enumerate(lines) if line.startswith("media"))
    rows = [line.split() for line in lines[header + 1:header + 7]]
    tokens = {(r[0], r[1], r[2] if r[2] == "none" else "8"): int(r[-7]) for r in rows}
    # The dry run's 8x8 maps: 16 tokens per tile with 2x2 compression, 64 without; 8 frames pool to 1 group.
    assert tokens[("image", "2x2", "none")] == 9 * 16 + 1 and tokens[("image", "none", "none")] == 9 * 64 + 1
    assert tokens[("video", "2x2", "8")] == 16 + 1 and tokens[("video", "none", "none")] == 8 * (64 + 1)
    # Ratios are against the uncompressed row of the same media, which therefore reads 1.0x.
    assert all(r[-2] == "1.0x" and r[-1] == "1.00x" for r in rows if r[1] == "none" and r[2] == "none")
