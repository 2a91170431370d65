"""A deterministic virtual-time simulation of the serving loop, to measure schedulers' fairness.

The real scheduler classes decide; a cost model stands in for the engine. Each step the running
requests decode one token each and newly admitted requests run their whole prompt (making their
first output token); the step takes a + b·(tokens in the step) virtual seconds. Admission (the
scheduler's `fits`) is the one of S-LoRA's router that the VTC artifact runs on: a token budget
per step (`batch_max_tokens`), a cap on running requests, and its KV memory check (running
requests sorted by remaining output, the pool must hold the worst point of their growth).

Workloads follow the artifact's `fair_bench` suites: per client a fixed rate with requests spread
evenly from a random phase (its "uniform" mode), fixed input and output lengths, optionally
alternating on and off periods. `CASES` holds the paper's headline case (two clients at 1.5 and
3 req/s, 256 in / 256 out, on an overloaded server), the on/off case and the weighted case.

What is measured, per pair of clients and only while both have requests waiting (backlogged):
the difference of the services they received (w_p·input + w_q·output, each divided by the
client's weight) accumulated since they both became backlogged. The VTC paper's theorem bounds it
by 2·max(w_p·L_input, w_q·M), L_input the longest prompt and M the tokens the KV pool holds.
"""

from __future__ import annotations

import dataclasses
import random

from serving.request import Request, SamplingParams
from serving.scheduler import RateLimited, Scheduler, make_scheduler


@dataclasses.dataclass(frozen=True)
class EngineModel:
    step_overhead_s: float = 0.03  # a: per-step time independent of the tokens
    per_token_s: float = 1e-4  # b: per token in the step (prompt or decode)
    token_budget: int = 1024  # tokens one step may process
    max_running: int = 64
    kv_capacity: int = 10_000  # tokens the KV pool holds (M in the bound)

    def step_time(self, tokens: int) -> float:
        return self.step_overhead_s + self.per_token_s * tokens


@dataclasses.dataclass(frozen=True)
class ClientLoad:
    name: str
    rate: float  # requests per second while on
    input_len: int = 256
    output_len: int = 256
    weight: float = 1.0
    on_off_s: tuple[float, float] | None = None  # (on, off) periods, starting on

    def arrival_times(self, duration_s: float, rng: random.Random) -> list[float]:
        if self.rate <= 0:
            return []
        gap = 1.0 / self.rate
        t, times = rng.uniform(0.0, gap), []
        while t < duration_s:
            if self.on_off_s is None or t % sum(self.on_off_s) < self.on_off_s[0]:
                times.append(t)
            t += gap
        return times


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    clients: tuple[ClientLoad, ...]
    duration_s: float = 360.0

    @property
    def weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.clients}


CASES = {
    # The paper's Figure 3: both clients ask for more than half the server.
    "overload": Workload("overload", (ClientLoad("c0", 1.5), ClientLoad("c1", 3.0))),
    # The artifact's on_off_overload shape (client 0 switches on and off beside a steady client 1), with
    # a 30 s on / 90 s off cycle so that client 0 drains its backlog and then idles: the idle time is
    # where a scheduler without the counter lift (LCF) lets it build up credit to spend on return.
    "on_off": Workload("on_off", (ClientLoad("c0", 3.0, on_off_s=(30.0, 90.0)), ClientLoad("c1", 3.0))),
    # The artifact's overload-weighted: four clients with weights 1..4, all over their share.
    "weighted": Workload("weighted", tuple(ClientLoad(f"c{i}", r, weight=float(i + 1))
                                           for i, r in enumerate([0.8, 0.8, 1.2, 1.6]))),
}


def fairness_bound(workload: Workload, engine: EngineModel, input_price: float = 1.0,
                   output_price: float = 2.0) -> float:
    """2·max(w_p·L_input, w_q·M), in units of the lightest client's weighted service."""
    longest_prompt = max(c.input_len for c in workload.clients)
    lightest = min(c.weight for c in workload.clients)
    return 2 * max(input_price * longest_prompt, output_price * engine.kv_capacity) / lightest


@dataclasses.dataclass
class SimResult:
    scheduler: str
    workload: str
    duration_s: float
    max_diff: float  # largest backlogged service difference between any two clients
    avg_diff: float  # its mean over the steps where a pair was backlogged
    throughput: float  # prompt + output tokens processed per second
    service: dict[str, float]  # per client, w_p·input + w_q·output received (unweighted)
    requests_done: dict[str, int]
    refused: dict[str, int]
    steps: int
    idle_s: float  # time with nothing to run


@dataclasses.dataclass
class RunningRequest:
    request: Request
    made: int = 0  # output tokens so far

    @property
    def remaining(self) -> int:
        return self.request.params.max_tokens - self.made


def fits_kv_memory(running: list[RunningRequest], candidate: Request, capacity: int) -> bool:
    """S-LoRA's admission memory check (`_can_add_new_req`): with the requests sorted by remaining
    output, longest first, the i-th request finishing is the point of peak use; every point must fit."""
    entries = [(r.remaining - 1, len(r.request.prompt_ids) + r.made) for r in running]
    entries.append((candidate.params.max_tokens - 1, len(candidate.prompt_ids) + 1))
    entries.sort(key=lambda e: -e[0])
    held, need = 0, 0
    for i, (left, length) in enumerate(entries):
        held += length
        need = max(need, left * (i + 1) + held)
    return need < capacity


class BackloggedDifference:
    """Service differences between every pair of clients while both are backlogged.

    Fed one sample per step; keeps, per pair, the range of the (weighted) service difference
    since both became backlogged: the largest difference accumulated over any interval in which
    both had requests waiting, the quantity the VTC theorem bounds."""

    def __init__(self, clients: list[str], weights: dict[str, float]):
        self.pairs = [(f, g) for i, f in enumerate(clients) for g in clients[i + 1:]]
        self.weights = {c: weights.get(c, 1.0) for c in clients}
        self.window: dict[tuple[str, str], tuple[float, float, float] | None] = {p: None for p in self.pairs}
        self.max_diff = 0.0
        self.sum_diff = 0.0
        self.samples = 0

    @property
    def avg_diff(self) -> float:
        return self.sum_diff / max(self.samples, 1)

    def record(self, service: dict[str, float], backlogged: dict[str, bool]) -> None:
        for f, g in self.pairs:
            if not (backlogged[f] and backlogged[g]):
                self.window[(f, g)] = None
                continue
            d = service.get(f, 0.0) / self.weights[f] - service.get(g, 0.0) / self.weights[g]
            win = self.window[(f, g)]
            base, lo, hi = (d, d, d) if win is None else (win[0], min(win[1], d), max(win[2], d))
            self.window[(f, g)] = (base, lo, hi)
            self.max_diff = max(self.max_diff, hi - lo)  # the worst interval inside this backlogged window
            self.sum_diff += abs(d - base)
            self.samples += 1


def simulate(scheduler: str | Scheduler, workload: Workload, engine: EngineModel = EngineModel(), *,
             seed: int = 0, rpm_limit: int | None = None) -> SimResult:
    """Run the workload for its duration through one scheduler; all randomness comes from seed."""
    if isinstance(scheduler, str):
        sched = make_scheduler(scheduler, weights=workload.weights, rpm_limit=rpm_limit)
    else:
        sched = scheduler
    rng = random.Random(seed)
    arrivals = sorted((t, c.name, i) for c in workload.clients for i, t in
                      enumerate(c.arrival_times(workload.duration_s, rng)))
    loads = {c.name: c for c in workload.clients}
    clients = [c.name for c in workload.clients]
    waiting = {c: 0 for c in clients}
    refused = {c: 0 for c in clients}
    done = {c: 0 for c in clients}
    tracker = BackloggedDifference(clients, workload.weights)
    running: list[RunningRequest] = []
    t, steps, tokens_done, idle_s, next_arrival = 0.0, 0, 0, 0.0, 0

    while t < workload.duration_s:
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= t:
            at, name, i = arrivals[next_arrival]
            next_arrival += 1
            load = loads[name]
            # Token ids do not matter to a scheduler; lengths do.
            request = Request(f"{name}-{i}", [1] * load.input_len, SamplingParams(max_tokens=load.output_len),
                              client=name, arrival_time=at)
            try:
                sched.add(request, at)
                waiting[name] += 1
            except RateLimited:
                refused[name] += 1
        if not running and sched.num_waiting == 0:
            if next_arrival == len(arrivals):
                idle_s += workload.duration_s - t
                break
            idle_s += arrivals[next_arrival][0] - t
            t = arrivals[next_arrival][0]
            continue

        new: list[RunningRequest] = []
        budget = [engine.token_budget - len(running)]

        def fits(request: Request) -> bool:
            if len(running) + len(new) >= engine.max_running or len(request.prompt_ids) > budget[0]:
                return False
            if not fits_kv_memory(running + new, request, engine.kv_capacity):
                return False
            budget[0] -= len(request.prompt_ids)
            new.append(RunningRequest(request))
            return True

        for request in sched.admit(fits, t):
            waiting[request.client] -= 1
        step_tokens = len(running) + sum(len(r.request.prompt_ids) for r in new)
        t += engine.step_time(step_tokens)
        steps += 1
        tokens_done += step_tokens
        running += new
        sched.on_decode([r.request for r in running])
        for r in running:
            r.made += 1
            if r.remaining == 0:
                sched.on_finish(r.request, r.made)
                done[r.request.client] += 1
        running = [r for r in running if r.remaining > 0]
        tracker.record(sched.service(), {c: waiting[c] > 0 for c in clients})

    return SimResult(
        scheduler=sched.name, workload=workload.name, duration_s=workload.duration_s,
        max_diff=tracker.max_diff, avg_diff=tracker.avg_diff,
        throughput=tokens_done / workload.duration_s, service=sched.service(), requests_done=done,
        refused=refused, steps=steps, idle_s=idle_s,
    )
