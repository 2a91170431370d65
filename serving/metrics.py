"""Server counters and the Prometheus text exposition of them and of the engine's metrics.

The format is Prometheus' text format 0.0.4: `# HELP` and `# TYPE` lines, then one
`name{label="value"} number` sample per line. Engine metrics come from `Engine.metrics()`;
tokens per second is measured here over a sliding window of finished-step reports.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jvila_"
RATE_WINDOW_S = 10.0

# Engine gauges: metrics() key → (metric name, help). Counters are the monotone ones.
_ENGINE_GAUGES = {
    "waiting": ("queue_length", "Requests waiting in the scheduler."),
    "running": ("running_requests", "Requests holding pages in the running batch."),
    "pages_total": ("pages_total", "Pages in the KV pool."),
    "pages_free": ("pages_free", "Pages no live sequence references (cached ones included)."),
    "pages_used": ("pages_used", "Pages referenced by live sequences."),
    "pages_shared": ("pages_shared", "Pages referenced by more than one sequence."),
}
_ENGINE_COUNTERS = {
    "prefix_hit_tokens": ("prefix_hit_tokens_total", "Prompt tokens served from shared pages instead of computed."),
    "tokens_generated": ("generated_tokens_total", "Output tokens sampled."),
    "prompt_tokens_computed": ("prompt_tokens_computed_total", "Prompt tokens run through the model."),
    "steps": ("engine_steps_total", "Engine steps run."),
    "preemptions": ("preemptions_total", "Sequences preempted (recomputed later) for lack of pages."),
    "finished": ("finished_requests_total", "Requests that ran to a finish reason."),
    "aborted": ("aborted_requests_total", "Requests aborted (client gone or cancelled)."),
}
_PER_CLIENT = {
    "client_service": ("client_service", "Service each client received, in the scheduler's cost "
                                         "(w_p per prompt token + w_q per output token)."),
    "scheduler_counters": ("scheduler_counter", "The scheduler's counter per client (VTC: virtual tokens)."),
}


class ServerMetrics:
    """HTTP-side counts (requests by endpoint and status, tokens sent) and the output token rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_tokens(self, *, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if completion:
                self._recent.append((self._clock(), completion))

    def count_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    def tokens_per_second(self) -> float:
        with self._lock:
            now = self._clock()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S


def render(server: ServerMetrics, engine_metrics: dict, *, model: str) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        full = PREFIX + name
        lines.append(f"# HELP {full} {help_}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            lines.append(f"{full}{_labels(labels)} {_number(value)}")

    model_label = {"model": model}
    for key, (name, help_) in _ENGINE_GAUGES.items():
        if key in engine_metrics:
            family(name, "gauge", help_, [(model_label, engine_metrics[key])])
    for key, (name, help_) in _ENGINE_COUNTERS.items():
        if key in engine_metrics:
            family(name, "counter", help_, [(model_label, engine_metrics[key])])
    for key, (name, help_) in _PER_CLIENT.items():
        per_client = engine_metrics.get(key) or {}
        family(name, "gauge", help_, [(model_label | {"client": str(c)}, v) for c, v in sorted(per_client.items())])
    family("output_tokens_per_second", "gauge", f"Output tokens sent per second over the last {RATE_WINDOW_S:g}s.",
           [(model_label, server.tokens_per_second())])
    with server._lock:
        requests = sorted(server.requests.items())
        prompt, completion, disconnects = server.prompt_tokens, server.completion_tokens, server.disconnects
    family("http_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
           [({"endpoint": e, "status": str(s)}, n) for (e, s), n in requests])
    family("usage_prompt_tokens_total", "counter", "Prompt tokens of answered requests.", [(model_label, prompt)])
    family("usage_completion_tokens_total", "counter", "Completion tokens sent.", [(model_label, completion)])
    family("client_disconnects_total", "counter", "Requests aborted because the client went away.",
           [(model_label, disconnects)])
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
