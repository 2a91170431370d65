"""Every Mosaic TPU kernel checked and timed on a TPU, in one command.

It has never run on a TPU in this project (none is available to it): the kernels are verified
by the TPU interpreter (tests) and compiled by libtpu (`tpu_compile_check.py`), but not timed.
It is prepared for users with a TPU VM; please add what it prints to `RESULTS.md`.

1. Correctness on the device (`tpu_suite_checks.py`): flash attention forward and forward +
   backward, paged decode, ragged paged attention, BGMV, SGMV and (with >= 2 devices) ring
   attention, bf16, against the fp32 references; `[check] <name> ... PASS/FAIL`.
2. Median times (`tpu_suite_cells.py`, timing.median_ms) against the XLA alternative and JAX's
   own TPU Pallas kernels where the installed jax has them (n/a where not): flash at 2k-8k
   tokens fwd and fwd+bwd; paged decode 8-64 sequences x 1k-8k context, pages of 16 and 32;
   ragged prefill + decode mixes; BGMV 1-1024 tokens and SGMV 4096 tokens at 4096 -> 4096,
   ranks 16/64, 1-100 adapters; ring attention over all local devices. Cells start in priority
   order (ours and the baseline first) while the time budget lasts; each fails soft.
   One table per kernel last: ms, TFLOP/s or GB/s, time relative to the table's baseline.

    python benchmarks/tpu_suite.py            # TPU VM, under ~8 minutes on one host
    python benchmarks/tpu_suite.py --dry-run  # CPU, tiny shapes, TPU interpreter (the test)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/tpu_suite.py --dry-run

Output also goes to $OUT/tpu_suite.log when OUT is set. Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
from timing import dry_run_samples, median_ms
from tpu_suite_cells import DRY, TPU, all_cells
from tpu_suite_checks import run_checks

TIME_BUDGET_S = 400.0  # cells start until this long after start-up (checks included)
DRY_TIME_BUDGET_S = 150.0


class Tee:
    """A stream that also writes to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()


def describe(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else '(no message)'}"


def time_cells(tables, dry_run, started):
    """Runs every cell by priority; (table, shape, variant) -> ms, or why there is none."""
    cells = sorted((cell for _, table_cells in tables for cell in table_cells),
                   key=lambda cell: cell.priority)  # stable: tables and shapes keep their order
    budget = DRY_TIME_BUDGET_S if dry_run else TIME_BUDGET_S
    samples = dry_run_samples(dry_run)
    cell_budget = 0.0 if dry_run else 0.2
    results = {}
    for cell in cells:
        key = (cell.table, cell.shape, cell.variant)
        if time.perf_counter() - started > budget:
            results[key] = "skipped: time budget"
            continue
        try:
            ms = median_ms(cell.build(), jax.block_until_ready, cell_budget, **samples)
            results[key] = ms
            print(f"[time] {cell.variant:<32} {cell.shape:<46} {ms:9.3f} ms", flush=True)
        except Exception as exc:
            results[key] = describe(exc)
            print(f"[time] {cell.variant:<32} {cell.shape:<46} FAILED {describe(exc)}",
                  flush=True)
    return results


def print_table(table, results):
    print(f"\n{table.title}; last column: time / {table.baseline} (lower is better)")
    header = f"{'variant':<32} {'shape':<46} {'ms':>9} {table.unit:>8} {'vs base':>8}"
    print(header)
    print("-" * len(header))
    for shape in table.shapes:
        base = results.get((table.key, shape, table.baseline))
        for variant in table.variants:
            value = results.get((table.key, shape, variant))
            if isinstance(value, float):
                rate = table.work[shape] / (value * 1e-3) / table.per_unit
                ratio = f"{value / base:8.2f}" if isinstance(base, float) else f"{'n/a':>8}"
                print(f"{variant:<32} {shape:<46} {value:9.3f} {rate:8.1f} {ratio}")
            elif value is not None:
                print(f"{variant:<32} {shape:<46} {'n/a':>9}  ({value[:100]})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, kernels in the TPU interpreter: checks the script")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if os.environ.get("OUT"):
        log = open(Path(os.environ["OUT"]) / "tpu_suite.log", "w")
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
    devices = jax.devices()
    print(f"# tpu_suite {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}"
          f"{' --dry-run' if args.dry_run else ''}")
    print(f"device {devices[0].device_kind} x {len(devices)} ({jax.default_backend()}), "
          f"jax {jax.__version__}", flush=True)
    if not args.dry_run and jax.default_backend() != "tpu":
        print("no TPU: use --dry-run on CPU", flush=True)
        return 2
    checks_pass = run_checks(small=args.dry_run, interpret=args.dry_run)

    tables = all_cells(DRY if args.dry_run else TPU, interpret=args.dry_run)
    results = time_cells(tables, args.dry_run, started)
    device = "cpu, TPU interpreter (dry run)" if args.dry_run else devices[0].device_kind
    print(f"\n# {device} x {len(devices)}, jax {jax.__version__}")
    if len(devices) < 2:
        print("\nring attention: skipped, needs >= 2 devices")
    for table, _ in tables:
        print_table(table, results)
    print(f"\nchecks {'all PASS' if checks_pass else 'FAILED'}; "
          f"total {time.perf_counter() - started:.1f} s", flush=True)
    return 0 if checks_pass else 1


if __name__ == "__main__":
    sys.exit(main())
