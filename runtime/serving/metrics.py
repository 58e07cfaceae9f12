"""Prometheus metrics of one server (its own registry: several servers in one process do not mix)."""

from __future__ import annotations

import threading
import time
from collections import deque

from runtime.errors import require
from runtime.serving.scheduler import Request, Scheduler, SchedulerObserver

TOKENS_WINDOW_S = 10.0  # tokens/s gauge: tokens generated over the last this many seconds


class ServerMetrics(SchedulerObserver):
    def __init__(self):
        prom = require("prometheus_client", "serve")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = prom.Counter("blip2_requests", "Generation requests by outcome (done, cancelled, timeout, "
                                     "error)", ["status"], registry=r)
        self.responses = prom.Counter("blip2_http_responses", "HTTP answers to chat completions by status code",
                                      ["code"], registry=r)
        self.disconnects = prom.Counter("blip2_client_disconnects", "Callers that went away before their answer",
                                        registry=r)
        self.tokens = prom.Counter("blip2_generated_tokens", "Tokens generated", registry=r)
        self.latency = prom.Histogram("blip2_request_latency_seconds", "Submission to last token", buckets=lat,
                                      registry=r)
        self.ttft = prom.Histogram("blip2_time_to_first_token_seconds", "Submission to first token", buckets=lat,
                                   registry=r)
        self.batch = prom.Histogram("blip2_batch_size", "Rows per decode step", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.step = prom.Histogram("blip2_decode_step_seconds", "One decode step of the running batch", registry=r,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.admit = prom.Histogram("blip2_admit_seconds", "Vision + Q-Former + prefill of the newcomers of one step",
                                    registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.admitted = prom.Histogram("blip2_admit_batch_size", "Newcomers admitted together (one vision + "
                                       "prefill batch)", registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.queue = prom.Gauge("blip2_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = prom.Gauge("blip2_running_requests", "Requests being generated", registry=r)
        self.tps = prom.Gauge("blip2_tokens_per_second", f"Tokens generated per second over the last "
                              f"{TOKENS_WINDOW_S:g} s", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.tps.set_function(self.tokens_per_second)

    def bind(self, scheduler: Scheduler) -> None:
        self.queue.set_function(lambda: scheduler.waiting)
        self.running.set_function(lambda: scheduler.running)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - TOKENS_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / TOKENS_WINDOW_S

    # -- scheduler hooks ---------------------------------------------------------------------------
    def on_step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step.observe(seconds)

    def on_admit(self, newcomers: int, seconds: float) -> None:
        self.admit.observe(seconds)
        self.admitted.observe(newcomers)

    def on_finish(self, req: Request, status: str, now: float) -> None:
        self.requests.labels(status).inc()
        n = len(req.tokens)
        if n:
            self.tokens.inc(n)
            with self._lock:
                self._recent.append((now, n))
        if status == "done":
            self.latency.observe(now - req.submitted)
            if req.first_token is not None:
                self.ttft.observe(req.first_token - req.submitted)

    def render(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST
