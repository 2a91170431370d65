"""The serving step alone on this CPU (SmolLM2-135M-Instruct, float32): today's `serving/step.py` against
an earlier commit's, loaded side by side in one process and timed in alternation, so that a busy
shared machine slows both alike. Decode steps (one token per row) at batch 1 and 8; the baseline runs
the blocked dense attention (the decode path switched off), as it did at that commit.

Prints medians of wall and process CPU time per step (CPU time is the steadier measure when other
processes share the cores) and the speed-up of today's step over the baseline's.

    python benchmarks/step_cpu.py [--baseline e285751] [--batches 1 8] [--context 130] [--repeats 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp
import numpy as np
from flax import nnx

import serving.step as current_step
from jvila.checkpoints.pretrained import load_pretrained
from jvila.models import attention as attention_module

MODEL = "smollm2-135m-instruct"


def baseline_module(commit: str, folder: str):
    """serving/step.py as it was at `commit`, imported under its own module name."""
    source = subprocess.run(["git", "show", f"{commit}:serving/step.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(folder) / "baseline_step.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_step"] = module
    spec.loader.exec_module(module)
    return module


def blocked_attention(*args, **kwargs):
    """The dense attention with its decode path off (what the baseline commit ran)."""
    attention_module.DECODE_FAST_PATH = False
    try:
        return attention_module.dense_attention(*args, **kwargs)
    finally:
        attention_module.DECODE_FAST_PATH = True


def decode_batch(module, rows: int, context: int, page_size: int, rng):
    pages = -(-(context + 1) // page_size)
    return module.StepBatch(
        token_ids=rng.integers(0, 49152, rows).astype(np.int32), cu_q_lens=np.arange(rows + 1, dtype=np.int32),
        context_lens=np.full(rows, context, np.int32),
        page_table=np.arange(rows * pages, dtype=np.int32).reshape(rows, pages),
        temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
        seeds=np.arange(rows), output_index=np.zeros(rows, np.int32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="e285751", help="commit whose serving/step.py is the baseline")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=130, help="tokens already cached per row")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    model, _ = load_pretrained(MODEL)
    graphdef, state = nnx.split(model)
    page_size, num_pages = 16, 512
    rows_out = []
    with tempfile.TemporaryDirectory() as folder:
        baseline = baseline_module(args.baseline, folder)
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            runners = {
                f"baseline {args.baseline}": (baseline.StepRunner(graphdef, state, num_pages=num_pages,
                                                                  page_size=page_size, max_pages_per_seq=128,
                                                                  attention=blocked_attention), baseline),
                "current": (current_step.StepRunner(graphdef, state, num_pages=num_pages, page_size=page_size,
                                                    max_pages_per_seq=128), current_step),
            }
            # The same cache contents for both (unit-scale random K/V, as a model's would be).
            shape = (num_pages, page_size, model.config.num_kv_heads, model.config.head_dim)
            k = [rng.standard_normal(shape, np.float32) for _ in range(model.config.num_layers)]
            v = [rng.standard_normal(shape, np.float32) for _ in range(model.config.num_layers)]
            work, results = {}, {}
            for name, (runner, module) in runners.items():
                runner.k_pages, runner.v_pages = tuple(map(jnp.asarray, k)), tuple(map(jnp.asarray, v))
                work[name] = decode_batch(module, batch, args.context, page_size, np.random.default_rng(0))
                results[name] = runner.run(work[name])  # compiles
            names = list(runners)
            same = np.array_equal(results[names[0]].next_tokens, results[names[1]].next_tokens)
            times = {name: ([], []) for name in names}
            for _ in range(args.repeats):  # alternate, so load changes hit both alike
                for name, (runner, _) in runners.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    runner.run(work[name])
                    times[name][0].append(time.perf_counter() - wall)
                    times[name][1].append(time.process_time() - cpu)
            base_wall, base_cpu = (statistics.median(t) for t in times[names[0]])
            for name in names:
                wall, cpu = (statistics.median(t) for t in times[name])
                rows_out.append((batch, name, wall, cpu, base_wall / wall, base_cpu / cpu, same))
    print(f"\n{MODEL} float32, decode steps, context {args.context}, {args.repeats} alternating repeats")
    print(f"{'batch':>6}  {'step':<20}{'wall ms':>9}{'CPU ms':>9}{'wall x':>8}{'CPU x':>8}  same tokens")
    for batch, name, wall, cpu, wall_x, cpu_x, same in rows_out:
        print(f"{batch:>6}  {name:<20}{wall * 1e3:>9.1f}{cpu * 1e3:>9.1f}{wall_x:>7.2f}x{cpu_x:>7.2f}x  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
