"""The scheduler interface every policy implements, and the bookkeeping they share.

The engine drives a scheduler with five calls:

- `add(request, now)` when a request arrives (RPM may refuse it: RateLimited);
- `admit(fits, now)` once per step: waiting requests are offered in the policy's order and each
  one that `fits` is admitted, until the first that does not (as the VTC artifact's batch
  formation stops at the first request that does not fit). `fits` is called at most once per
  request and call, and True means the request is admitted, so it may reserve pages as it answers;
- `on_decode(requests)` after each step, one entry per new token (the first output token, made
  by the prompt's last chunk, included: a request's total cost is then w_p·input + w_q·output);
- `on_finish(request, num_output_tokens)` once when an admitted request leaves for good (finished
  or aborted, running or requeued); a request never admitted is ignored. Tokens on_decode has not
  reported yet are charged here, so the engine may end a request before or after reporting its
  step's tokens: each output token is charged exactly once either way;
- `requeue(request)` when the engine preempts a running request: it goes back to the front of
  its queue and, re-admitted later, is not charged its prompt again (the recomputation is the
  engine's doing, not the client's). Preempting several at once, requeue the newest first so
  the queue keeps their order.

Cost of service: prompt tokens at w_p and output tokens at w_q (defaults 1 and 2, the VTC paper's
choice after OpenAI's price ratio), or the artifact's fitted `profile` cost. `service()` is the
cost each client actually received, for every policy; `counters()` is what the policy orders
by (the virtual token counters for the VTC family, the service for FCFS and RPM).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

from serving.request import Request


class RateLimited(ValueError):
    """A client sent more requests than its rate limit allows; the request was not queued."""


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """Service of a request: input_price per prompt token plus output_price per output token."""

    input_price: float = 1.0  # w_p
    output_price: float = 2.0  # w_q

    def __post_init__(self):
        if self.input_price < 0 or self.output_price < 0:
            raise ValueError(f"prices must be non-negative, got {self.input_price} and {self.output_price}")

    def prefill(self, num_input: int) -> float:
        return self.input_price * num_input

    def output(self, num_input: int, num_output: float) -> float:
        """Cost of the first num_output output tokens (num_output may be a fractional prediction)."""
        return self.output_price * num_output


@dataclasses.dataclass(frozen=True)
class ProfileCost:
    """The artifact's cost fitted to measured step times (`cost_func_profile` in its req_queue.py):
    h(x, y) = 0.21001891x + 0.10075395y + 0.0039868xy + 0.00324733y² + 1.14601454 for x input
    and y output tokens. The prompt costs h(x, 0) and the t-th output token h(x, t) - h(x, t-1),
    so a finished request has cost h(x, y) in all (the artifact charges a step's token with the
    length before it; the sum here telescopes exactly)."""

    def h(self, x: float, y: float) -> float:
        return 0.21001891 * x + 0.10075395 * y + 0.0039868 * x * y + 0.00324733 * y * y + 1.14601454

    def prefill(self, num_input: int) -> float:
        return self.h(num_input, 0)

    def output(self, num_input: int, num_output: float) -> float:
        return self.h(num_input, num_output) - self.h(num_input, 0)


def make_cost(cost: str, input_price: float = 1.0, output_price: float = 2.0):
    if cost == "linear":
        return LinearCost(input_price, output_price)
    if cost == "profile":
        return ProfileCost()
    raise ValueError(f"unknown cost function {cost!r}; choose 'linear' or 'profile'")


@dataclasses.dataclass
class Admitted:
    """What the scheduler remembers of a request between admission and its end."""

    request: Request
    num_input: int
    num_output: int = 0
    predicted: float = 0.0  # output tokens charged in advance (VTC with length prediction)

    @property
    def client(self) -> str:
        return self.request.client


class Scheduler(abc.ABC):
    """Waiting requests, the order they are admitted in, and the per-client accounts."""

    name = "scheduler"

    def __init__(self, *, cost=None, weights: dict[str, float] | None = None):
        self.cost = cost if cost is not None else LinearCost()
        self._weights: dict[str, float] = {}
        for client, weight in (weights or {}).items():
            self.set_weight(client, weight)
        self._waiting: dict[str, Request] = {}  # by request id
        self._running: dict[str, Admitted] = {}
        self._preempted: dict[str, Admitted] = {}  # requeued; keeps what was charged
        self._service: dict[str, float] = {}

    # ---- what a policy defines -----------------------------------------------------------------

    @abc.abstractmethod
    def _enqueue(self, request: Request, now: float) -> None:
        """Put a new request at the back of its queue."""

    @abc.abstractmethod
    def _enqueue_front(self, request: Request) -> None:
        """Put a preempted request at the front of its queue."""

    @abc.abstractmethod
    def _head(self) -> Request | None:
        """The request the policy would admit next."""

    @abc.abstractmethod
    def _dequeue(self, request: Request) -> None:
        """Take a request (the head, or an aborted one) out of the queues."""

    def _charge_admission(self, state: Admitted) -> None:
        """Policy accounting when a request is admitted for the first time."""

    def _charge_output(self, state: Admitted, cost: float) -> None:
        """Policy accounting for one new output token of the given cost."""

    def _settle(self, state: Admitted, num_output_tokens: int) -> None:
        """Policy accounting when an admitted request ends."""

    def counters(self) -> dict[str, float]:
        return dict(self._service)

    # ---- the interface -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def waiting_by_client(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for request in self._waiting.values():
            counts[request.client] = counts.get(request.client, 0) + 1
        return counts

    def weight(self, client: str) -> float:
        return self._weights.get(client, 1.0)

    def set_weight(self, client: str, weight: float) -> None:
        """A client's share (VTC family; other policies keep it but do not use it)."""
        if not weight > 0:
            raise ValueError(f"client {client!r}: weight must be positive, got {weight}")
        self._weights[client] = float(weight)

    def service(self) -> dict[str, float]:
        """Cost of the service each client received so far (prompt when admitted, outputs as made)."""
        return dict(self._service)

    def add(self, request: Request, now: float) -> None:
        rid = request.request_id
        if rid in self._waiting or rid in self._running or rid in self._preempted:
            raise ValueError(f"request {rid!r} is already in the scheduler")
        self._enqueue(request, now)
        self._waiting[rid] = request

    def remove(self, request_id: str) -> Request | None:
        """Take a waiting request out (aborted before it ran); None if it is not waiting."""
        request = self._waiting.pop(request_id, None)
        if request is not None:
            self._dequeue(request)
        return request

    def admit(self, fits: Callable[[Request], bool], now: float) -> list[Request]:
        admitted = []
        while (request := self._head()) is not None:
            if not fits(request):
                break
            self._dequeue(request)
            del self._waiting[request.request_id]
            state = self._preempted.pop(request.request_id, None)
            if state is None:
                state = Admitted(request, num_input=len(request.prompt_ids))
                self._add_service(state.client, self.cost.prefill(state.num_input))
                self._charge_admission(state)
            self._running[request.request_id] = state
            admitted.append(request)
        return admitted

    def on_decode(self, requests: list[Request]) -> None:
        """Charge one output token per entry. Requests no longer running are skipped: when the
        engine ends a request before reporting its step's tokens, on_finish has settled them."""
        for request in requests:
            state = self._running.get(request.request_id)
            if state is not None:
                self._count_output(state)

    def on_finish(self, request: Request, num_output_tokens: int) -> None:
        """Settle an admitted request: output tokens not yet charged are charged now, then the
        policy's own settlement (length prediction refunds)."""
        if num_output_tokens < 0:
            raise ValueError(f"num_output_tokens must be non-negative, got {num_output_tokens}")
        rid = request.request_id
        state = self._running.pop(rid, None) or self._preempted.pop(rid, None)
        if state is None:
            return
        while state.num_output < num_output_tokens:
            self._count_output(state)
        self._settle(state, num_output_tokens)

    def requeue(self, request: Request) -> None:
        state = self._running.pop(request.request_id, None)
        if state is None:
            raise ValueError(f"request {request.request_id!r} is not running, so it cannot be requeued")
        self._preempted[request.request_id] = state
        self._enqueue_front(request)
        self._waiting[request.request_id] = request

    # ---- shared helpers ------------------------------------------------------------------------

    def _count_output(self, state: Admitted) -> None:
        state.num_output += 1
        cost = (self.cost.output(state.num_input, state.num_output)
                - self.cost.output(state.num_input, state.num_output - 1))
        self._add_service(state.client, cost)
        self._charge_output(state, cost)

    def _add_service(self, client: str, cost: float) -> None:
        self._service[client] = self._service.get(client, 0.0) + cost
