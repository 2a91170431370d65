"""Scheduling policies behind one interface; `serving.scheduler.make_scheduler` picks one by name."""

from serving.schedulers.base import Admitted, LinearCost, ProfileCost, RateLimited, Scheduler, make_cost
from serving.schedulers.fcfs import FCFSScheduler, RPMScheduler
from serving.schedulers.vtc import LCFScheduler, VTCPredictScheduler, VTCScheduler

__all__ = [
    "Admitted", "FCFSScheduler", "LCFScheduler", "LinearCost", "ProfileCost", "RPMScheduler", "RateLimited",
    "Scheduler", "VTCPredictScheduler", "VTCScheduler", "make_cost",
]
