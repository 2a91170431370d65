"""First come, first served, and the requests-per-minute cap on top of it.

FCFS is S-LoRA's `ReqQueue` (the artifact's `slora` scheduler): one queue in arrival order, batch
formation stopping at the first request that does not fit. RPM is the artifact's `lshare_fair`
(`lshare_req_queue.py`): a request from a client that already had `rpm_limit` requests accepted
in the last 60 seconds (arrival times t with now - t <= 60) is refused on arrival; accepted ones
are served first come, first served. The artifact aborts the refused request and answers it
empty; here `add` raises RateLimited so the server can answer 429.
"""

from __future__ import annotations

import collections

from serving.request import Request
from serving.schedulers.base import RateLimited, Scheduler

RPM_WINDOW_S = 60.0


class FCFSScheduler(Scheduler):
    name = "fcfs"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._queue: collections.deque[Request] = collections.deque()

    def _enqueue(self, request: Request, now: float) -> None:
        self._queue.append(request)

    def _enqueue_front(self, request: Request) -> None:
        self._queue.appendleft(request)

    def _head(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def _dequeue(self, request: Request) -> None:
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        else:
            self._queue.remove(request)


class RPMScheduler(FCFSScheduler):
    name = "rpm"

    def __init__(self, rpm_limit: int, **kwargs):
        if not isinstance(rpm_limit, int) or rpm_limit < 1:
            raise ValueError(f"rpm_limit must be a positive integer, got {rpm_limit!r}")
        super().__init__(**kwargs)
        self.rpm_limit = rpm_limit
        self._accepted_at: dict[str, collections.deque[float]] = {}
        self.refused: dict[str, int] = {}

    def add(self, request: Request, now: float) -> None:
        times = self._accepted_at.setdefault(request.client, collections.deque())
        while times and now - times[0] > RPM_WINDOW_S:
            times.popleft()
        if len(times) >= self.rpm_limit:
            self.refused[request.client] = self.refused.get(request.client, 0) + 1
            raise RateLimited(f"client {request.client!r} is over its limit of {self.rpm_limit} requests per minute")
        super().add(request, now)
        times.append(now)
