"""benchmarks/timing.py's median_ms on a fake clock: which calls it makes, how it sizes a sample, what it returns.

The dry runs of the benchmark scripts take the short path (`settle=False`); the full path is what real runs take,
so it is checked here.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import timing


class FakeDevice:
    """A call that takes `seconds[i]` of fake time on its i-th launch (the last value repeats)."""

    def __init__(self, monkeypatch, seconds):
        self.now, self.seconds, self.calls, self.syncs = 0.0, seconds, 0, 0
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: self.now))

    def call(self):
        self.now += self.seconds[min(self.calls, len(self.seconds) - 1)]
        self.calls += 1
        return self.calls

    def sync(self, result):
        assert result == self.calls  # the result of the latest launch is the one waited on
        self.syncs += 1


def test_full_path_settles_probes_and_batches_launches(monkeypatch):
    # compile 2 s, settle 0.5 s, probe 1 ms (so 5 launches fill a 5.5 ms sample), then 1 ms a launch.
    device = FakeDevice(monkeypatch, [2.0, 0.5, 1e-3, 1e-3])
    ms = timing.median_ms(device.call, device.sync, budget_s=0.0, min_samples=4, max_samples=30, sample_s=0.0055)
    assert abs(ms - 1.0) < 1e-9
    assert device.calls == 3 + 4 * 5  # compile, settle, probe, then 4 samples of 5 launches
    assert device.syncs == 3 + 4  # one sync a sample, not one a launch


def test_samples_stop_at_max_or_once_the_budget_is_spent(monkeypatch):
    device = FakeDevice(monkeypatch, [1.0, 1.0, 0.01, 0.01])  # 10 ms probe: one launch a sample
    timing.median_ms(device.call, device.sync, budget_s=100.0, min_samples=2, max_samples=6)
    assert device.calls == 3 + 6
    device = FakeDevice(monkeypatch, [1.0, 1.0, 0.01, 0.01, 0.03, 0.02])
    ms = timing.median_ms(device.call, device.sync, budget_s=0.0, min_samples=3, max_samples=6)
    assert device.calls == 3 + 3
    assert abs(ms - 20.0) < 1e-9  # median of 10, 30 and 20 ms


def test_dry_run_compiles_once_then_takes_one_launch(monkeypatch):
    device = FakeDevice(monkeypatch, [3.0, 0.25])
    ms = timing.median_ms(device.call, device.sync, budget_s=10.0, **timing.dry_run_samples(True))
    assert abs(ms - 250.0) < 1e-9
    assert device.calls == 2 and device.syncs == 2
    assert timing.dry_run_samples(False) == {}
