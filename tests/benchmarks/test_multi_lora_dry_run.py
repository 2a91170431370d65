"""benchmarks/multi_lora.py: its S-LoRA workload generator, and the whole benchmark end to end on a tiny model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from multi_lora import synthetic_trace


def test_synthetic_trace_follows_the_workload_parameters():
    n = 20000
    for cv in (0.5, 1.0, 3.0):
        trace = synthetic_trace(100, alpha=1.0, req_rate=4.0, cv=cv, num_requests=n, input_range=(8, 512),
                                output_range=(8, 512), seed=3)
        arrivals = np.asarray([t[0] for t in trace])
        gaps = np.diff(np.concatenate([[0.0], arrivals]))
        # 20000 Gamma draws: mean and CV within a few percent (the CV's sampling error grows with cv).
        assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.03 * max(1.0, cv))
    lengths = np.asarray([(t[2], t[3]) for t in trace])
    assert lengths.min() == 8 and lengths.max() == 511  # uniform integers in [8, 512)
    # Popularity: P(index < k) = (k / n) ** alpha for the power law of exponent alpha.
    for alpha in (0.3, 1.0):
        idx = np.asarray([t[1] for t in synthetic_trace(100, alpha=alpha, req_rate=1.0, cv=1.0, num_requests=n)])
        assert idx.min() >= 0 and idx.max() <= 99
        for k in (1, 10, 50):
            assert np.mean(idx < k) == pytest.approx((k / 100) ** alpha, abs=0.015)
    with pytest.raises(ValueError, match="positive"):
        synthetic_trace(0, alpha=1.0, req_rate=1.0, cv=1.0, num_requests=5)


def test_multi_lora_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "benchmarks/multi_lora.py", "--dry-run"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+2\s+(slora|slora-bf16|peft|merged)\s", line)]
    assert [r[1] for r in runs] == ["slora", "slora-bf16", "peft", "merged"], proc.stdout
    assert len({r[2] for r in runs}) == 1 and int(runs[0][2]) > 0  # every system made the same output tokens
    assert int(runs[0][6]) >= 1 and int(runs[1][6]) >= 1  # slora loaded adapters into the pool
    ratio_row = proc.stdout.split("relative to one merged model")[1].strip().splitlines()[-1].split()
    wall, cpu = ratio_row[1:5], ratio_row[6:10]  # adapters, 4 systems, "|", 4 systems
    assert wall[-1] == cpu[-1] == "1.00x" and all(float(r[:-1]) > 0 for r in wall + cpu)


def test_lora_columns_cpu_dry_run(capsys):
    from lora_columns_cpu import main

    assert main(["--dry-run"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x") and "ms" not in line]
    # Per adapter dtype: decode, then all columns and the tail for prompts of 1 and 4 adapters.
    assert len(rows) == 10 and sum("tail" in r for r in rows) == 4, rows
    for row in rows:
        assert all(float(v) > 0 for v in row.split()[-4:-2])  # times of the base and base + adapters (no ordering:
        # one sample of two layers is noise)
