"""One way to time a device call, shared by every benchmark script.

Sub-millisecond kernels cannot be timed one call at a time: the host's dispatch and sync cost as
much as the kernel. Each sample therefore launches the call back to back enough times to fill
~5 ms and syncs once at the end; the sample is that wall time divided by the launches.
"""

from __future__ import annotations

import statistics
import time


def median_ms(call, sync, budget_s: float, *, max_samples: int = 30, min_samples: int = 5,
              sample_s: float = 0.005, settle: bool = True) -> float:
    """Median milliseconds per call of `call()`; `sync(result)` waits for the device.

    `settle=False` skips the settling call and the probe that sizes a sample: one launch a sample.
    """
    sync(call())  # compile
    launches = 1
    if settle:
        sync(call())  # settle autotuning and lazy initialisation
        start = time.perf_counter()
        sync(call())
        single = time.perf_counter() - start
        launches = max(1, min(200, int(sample_s / max(single, 1e-6))))
    samples = []
    started = time.perf_counter()
    while len(samples) < max_samples:
        start = time.perf_counter()
        for _ in range(launches):
            result = call()
        sync(result)
        samples.append((time.perf_counter() - start) / launches)
        if len(samples) >= min_samples and time.perf_counter() - started > budget_s:
            break
    return statistics.median(samples) * 1e3


def dry_run_samples(dry_run: bool) -> dict:
    """`median_ms` settings for a dry run: it checks that a script runs, so one sample of one launch a cell
    (after the compiling call) is enough. In the TPU interpreter a call can take a second."""
    return {"min_samples": 1, "max_samples": 1, "settle": False} if dry_run else {}
