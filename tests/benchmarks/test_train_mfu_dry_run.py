"""benchmarks/train_mfu.py: its model-FLOP count, and the whole benchmark end to end on a tiny model (CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_mfu import GPU_MODEL, model_flops_per_step


def test_model_flops_of_the_gpu_config():
    c = GPU_MODEL
    e, h, kv, d, m, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    per_layer = e * h * d + 2 * e * kv * d + h * d * e + (h + 2 * kv) * d + 3 * e * m + 2 * e
    non_embedding = c.num_layers * per_layer + e + e * v  # + final norm + the untied LM head
    assert 1.32e9 < non_embedding + v * e < 1.34e9  # the 1.33B model of the benchmark's docstring
    rows, seq = 8, 2048
    want = rows * seq * (6 * non_embedding + 6 * c.num_layers * h * d * seq)
    assert model_flops_per_step(c, rows, seq) == want


def test_train_mfu_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on the GPU
    proc = subprocess.run([sys.executable, "benchmarks/train_mfu.py", "--dry-run"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    flops = float(re.search(r"([\d.e+]+) model FLOPs per step", proc.stdout).group(1))
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^(plain|ours)\s", line)]
    assert [r[:3] for r in rows] == [["plain", "dots", "xla"], ["ours", "full", "unpacked"]], proc.stdout
    for system, remat, attention, ms, tokens_per_s, tflops, mfu, ratio in rows:
        assert float(ms) > 0 and mfu == "n/a"  # a CPU has no stated peak
        # tokens/s = 2 x 32 tokens / step time; TFLOP/s = model FLOPs / step time (printed rounded).
        assert abs(float(tokens_per_s) - 64 / (float(ms) / 1e3)) <= 0.06 * float(tokens_per_s)
        assert abs(float(tflops) - flops / (float(ms) / 1e3) / 1e12) <= 0.06 * float(tflops) + 1e-3
    assert rows[0][-1] == "1.00x" and float(rows[1][-1][:-1]) > 0
