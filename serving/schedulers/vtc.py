"""The Virtual Token Counter family (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24).

Semantics follow the authors' artifact (Ying1123/VTC-artifact, slora/server/router/):

- `VTCScheduler` is `vtc_req_queue.py`. One FIFO queue and one virtual counter per client. A
  client seen for the first time starts at 0. When a client's queue goes from empty to one
  request, its counter is lifted to the smallest counter among the *other* clients with waiting
  requests (left alone if there are none; the paper's Algorithm 1 also lifts to the last client to
  leave when nobody waits, which the artifact does not do, and neither do we). Admission takes the
  head of the client with the smallest counter (ties to the client seen first), charges it
  w_p·input / weight, and repeats until a request does not fit. Each new output token charges
  w_q / weight. Clients' weights (the artifact's `--fair-weights`, default 1) make weighted VTC.
- `LCFScheduler` is `lcf_req_queue.py`: the same without the lift, so a client returning from
  idleness spends the credit it built up (the paper's ablation).
- `VTCPredictScheduler` is `vtc_pred_len_req_queue.py`: admission charges the prompt and the
  client's predicted output length; output tokens are charged only past the prediction; a request
  that ends short is refunded the difference. The prediction starts at 0, becomes the first
  finished request's length, then moves as (4·prediction + actual) / 5.

Deliberate differences from the artifact:
- The memory and token-budget checks of its batch formation (`_can_add_new_req`,
  `batch_max_tokens`) are the engine's, behind `fits`.
- It charges every running request one decode token before each decode step and again, for every
  request of the batch, whenever one of them finishes (`_handle_finish_req` calls `update_counter`
  a second time); the prompt step's token is not charged. Here each output token is charged
  exactly once, the first one included, so a request costs exactly w_p·input + w_q·output.
- Aborted requests are taken out of the queue at once rather than skipped at admission.
- A preempted request goes back to the front of its client's queue without a lift and is not
  charged its prompt again (the artifact does not preempt).

The bound (the paper's theorem, for linear cost): while two clients both have requests waiting,
their services received differ by at most 2·max(w_p·L_input, w_q·M) over any interval, L_input
the longest prompt and M the most tokens the running batch can hold. The simulation in
serving/fairness_sim.py checks it.
"""

from __future__ import annotations

import collections

from serving.request import Request
from serving.schedulers.base import Admitted, Scheduler


class VTCScheduler(Scheduler):
    name = "vtc"
    lift = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Insertion order is first appearance: the tie-break among equal counters, as in the artifact.
        self._queues: dict[str, collections.deque[Request]] = {}
        self._counter: dict[str, float] = {}

    def counters(self) -> dict[str, float]:
        return dict(self._counter)

    def _enqueue(self, request: Request, now: float) -> None:
        client = request.client
        if client not in self._queues:
            self._queues[client] = collections.deque()
            self._counter[client] = 0.0
        queue = self._queues[client]
        queue.append(request)
        if self.lift and len(queue) == 1:
            others = [self._counter[c] for c, q in self._queues.items() if q and c != client]
            if others:
                self._counter[client] = max(self._counter[client], min(others))

    def _enqueue_front(self, request: Request) -> None:
        client = request.client
        if client not in self._queues:  # cannot happen for a request that was admitted, but stay total
            self._queues[client] = collections.deque()
            self._counter[client] = 0.0
        self._queues[client].appendleft(request)

    def _head(self) -> Request | None:
        best = None
        for client, queue in self._queues.items():
            if queue and (best is None or self._counter[client] < self._counter[best]):
                best = client
        return None if best is None else self._queues[best][0]

    def _dequeue(self, request: Request) -> None:
        queue = self._queues[request.client]
        if queue[0] is request:
            queue.popleft()
        else:
            queue.remove(request)

    def _charge(self, client: str, cost: float) -> None:
        self._counter[client] += cost / self.weight(client)

    def _charge_admission(self, state: Admitted) -> None:
        self._charge(state.client, self.cost.prefill(state.num_input))

    def _charge_output(self, state: Admitted, cost: float) -> None:
        self._charge(state.client, cost)


class LCFScheduler(VTCScheduler):
    """Least counter first: VTC without the lift."""

    name = "lcf"
    lift = False


class VTCPredictScheduler(VTCScheduler):
    """VTC charging each client's predicted output length up front."""

    name = "vtc_predict"
    prediction_window = 5  # the moving average: (4·prediction + actual) / 5

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._predicted_len: dict[str, float] = {}

    def predicted_length(self, client: str) -> float:
        return self._predicted_len.get(client, 0.0)

    def _charge_admission(self, state: Admitted) -> None:
        state.predicted = self.predicted_length(state.client)
        self._charge(state.client, self.cost.prefill(state.num_input)
                     + self.cost.output(state.num_input, state.predicted))

    def _charge_output(self, state: Admitted, cost: float) -> None:
        if state.num_output > state.predicted:  # tokens within the prediction were paid at admission
            self._charge(state.client, cost)

    def _settle(self, state: Admitted, num_output_tokens: int) -> None:
        if num_output_tokens < state.predicted:
            refund = (self.cost.output(state.num_input, state.predicted)
                      - self.cost.output(state.num_input, num_output_tokens))
            self._charge(state.client, -refund)
        old = self.predicted_length(state.client)
        if old == 0:
            self._predicted_len[state.client] = float(num_output_tokens)
        else:
            w = self.prediction_window
            self._predicted_len[state.client] = (old * (w - 1) + num_output_tokens) / w
