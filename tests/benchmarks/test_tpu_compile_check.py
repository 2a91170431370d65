"""The Mosaic TPU kernels and the model that calls them compile for a TPU (libtpu, no TPU needed).

Runs `benchmarks/tpu_compile_check.py --quick` in its own process: libtpu must be importable
there (`make install` puts it in .venv/libtpu, or set JVILA_LIBTPU_DIR) and must not be in this
one, where jax would then look for a TPU.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBTPU_DIR = Path(os.environ.get("JVILA_LIBTPU_DIR", ROOT / ".venv" / "libtpu"))


def test_tpu_kernels_and_model_compile():
    assert (LIBTPU_DIR / "libtpu").is_dir(), f"no libtpu in {LIBTPU_DIR}: run `make install`"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(LIBTPU_DIR), str(ROOT)]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "benchmarks/tpu_compile_check.py", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(" ok")]
    # Every case of the quick list: flash fwd and fwd+bwd, paged decode (head_dim 128 and 64),
    # ragged, BGMV, SGMV, a 4-chip ring forward and forward+backward, and the model's train
    # step, decode step and prefill chunk on a 2x2 mesh.
    assert len(rows) == 12, proc.stdout
    assert "compiled for TPU" in proc.stdout
