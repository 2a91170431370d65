"""benchmarks/serve_throughput.py end to end on a tiny random model: the server under load in float32 and
bfloat16, transformers alongside in the same dtype, the prefix-sharing run, and the tables it prints. Keeps
the benchmark runnable at any commit.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_throughput_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a server has
    proc = subprocess.run([sys.executable, "benchmarks/serve_throughput.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+\s", line)]
    # One table per dtype (float32, then bfloat16 against torch bfloat16), one row per load level.
    assert [int(r[0]) for r in rows] == [1, 4, 1, 4], proc.stdout
    assert re.search(r"^float32 \(jvila float32, transformers float32\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^bfloat16 \(jvila bfloat16, transformers bfloat16\)$", proc.stdout, re.M), proc.stdout
    for row in rows:
        assert float(row[2]) > 0 and row[-1].endswith("x") and float(row[-1][:-1]) > 0
    prefix = [line.split() for line in proc.stdout.splitlines() if line.startswith(("unique", "shared"))]
    assert [p[0] for p in prefix] == ["unique", "shared"] and prefix[0][-1] == "1.00x"
    hits = int(re.search(r"prefix-hit tokens so far: (\d+)", proc.stdout).group(1))
    assert hits > 0  # the shared system prompt was served from shared pages
