"""benchmarks/cpu_matmul.py runs and reports a row per (rows, dtype) with rates consistent with its times."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_matmul  # noqa: E402


def test_cpu_matmul_reports_each_shape(capsys):
    assert cpu_matmul.main(["--rows", "1", "3", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("read bandwidth") and float(lines[1].split()[-2]) > 0
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["3"])]
    assert [(r[0], r[1]) for r in rows] == [("1", "float32"), ("3", "float32"), ("1", "bfloat16"), ("3", "bfloat16")]
    for r in rows:  # the weight rate is the 30 weights' bytes over the time printed
        itemsize = 4 if r[1] == "float32" else 2
        assert abs(float(r[3]) - 30 * 576 * 1536 * itemsize / float(r[2]) / 1e6) <= 0.1 + 0.02 * float(r[3])
