"""Which waiting request the engine admits next: the scheduler interface and `make_scheduler`.

Policies (serving/schedulers/): "fcfs" (first come, first served), "rpm" (FCFS behind a
requests-per-minute cap per client), "lcf" (least counter first), "vtc" (the Virtual Token
Counter fair scheduler; weighted when clients have weights), "vtc_weighted" (VTC that insists on
weights), "vtc_predict" (VTC charging a predicted output length up front). The interface and how
the engine drives it are described in serving/schedulers/base.py.
"""

from __future__ import annotations

from serving.schedulers import (
    FCFSScheduler,
    LCFScheduler,
    RateLimited,
    RPMScheduler,
    Scheduler,
    VTCPredictScheduler,
    VTCScheduler,
    make_cost,
)

SCHEDULERS = ("fcfs", "rpm", "lcf", "vtc", "vtc_weighted", "vtc_predict")

__all__ = ["SCHEDULERS", "RateLimited", "Scheduler", "make_scheduler"]


def make_scheduler(
    name: str,
    *,
    weights: dict[str, float] | None = None,
    rpm_limit: int | None = None,
    input_price: float = 1.0,
    output_price: float = 2.0,
    cost: str = "linear",
) -> Scheduler:
    """A scheduler by name. Weights (client -> share, default 1) steer the VTC family; FCFS, RPM
    keep them unused. rpm_limit is required by "rpm" and refused elsewhere."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if (rpm_limit is not None) != (name == "rpm"):
        raise ValueError("rpm_limit is required by the 'rpm' scheduler and applies to no other")
    if name == "vtc_weighted" and not weights:
        raise ValueError("'vtc_weighted' needs weights (client -> share)")
    common = dict(cost=make_cost(cost, input_price, output_price), weights=weights)
    if name == "fcfs":
        return FCFSScheduler(**common)
    if name == "rpm":
        return RPMScheduler(rpm_limit, **common)
    if name == "lcf":
        return LCFScheduler(**common)
    if name == "vtc_predict":
        return VTCPredictScheduler(**common)
    return VTCScheduler(**common)
