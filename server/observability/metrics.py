"""Prometheus metrics (one registry per app, so several apps can live in one process).

Every label value comes from a fixed set, whatever a request sends (a label per distinct value
is a new time series, so a request-chosen label is memory and /metrics size an attacker
controls): `http_method_label` maps the HTTP method to the standard ones or `other`,
`status_label` the status to its three digits or `other`, `steering_label` the steering method to
a known method, `composed` (a list), `n/a` or `other`. Endpoints are route templates (or
`unmatched`), never the request's path.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from steering.catalog import METHODS

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STEERING_LABELS = frozenset({*METHODS, "composed", "n/a"})
OTHER = "other"


def http_method_label(method: str) -> str:
    return method if method in HTTP_METHODS else OTHER


def status_label(status: int | str) -> str:
    text = str(status)
    return text if len(text) == 3 and text.isdigit() else OTHER


def steering_label(method: str) -> str:
    return method if method in STEERING_LABELS else OTHER


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.http_requests = Counter(
            "steer_http_requests", "HTTP requests by route, HTTP method and status",
            ["endpoint", "http_method", "status"], registry=r)
        self.requests = Counter(
            "steer_requests", "Completion requests by endpoint, steering method and status",
            ["endpoint", "method", "status"], registry=r)
        self.queue_wait = Histogram(
            "steer_queue_wait_seconds", "Time a generation waited in the engine's queue",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds", "Time from arrival to the first token",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "steer_inter_token_latency_seconds", "Time between consecutive tokens of a generation",
            ["method"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(
            "steer_e2e_request_latency_seconds", "Time from arrival to the last token",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "steer_prompt_tokens", "Prompt tokens processed", ["method"], registry=r)
        self.generation_tokens = Counter(
            "steer_generation_tokens", "Tokens generated", ["method"], registry=r)
        self.running = Gauge("steer_requests_running", "Generations decoding now", registry=r)
        self.waiting = Gauge("steer_requests_waiting", "Generations waiting in the queue",
                             registry=r)
        self.prefix_hits = Gauge("steer_prefix_cache_hits", "Prefills whose chat-template "
                                 "opening came from the prefix cache, since start", registry=r)
        self.prefix_misses = Gauge("steer_prefix_cache_misses", "Prefills that computed the "
                                   "chat-template opening, since start", registry=r)
        self._stats: Callable[[], dict] | None = None
        self.running.set_function(lambda: self._stat("running"))
        self.waiting.set_function(lambda: self._stat("waiting"))
        self.prefix_hits.set_function(lambda: self._stat("prefix_cache_hits"))
        self.prefix_misses.set_function(lambda: self._stat("prefix_cache_misses"))

    def bind_stats(self, stats: Callable[[], dict] | None) -> None:
        """Read the engine's gauges (running, waiting, prefix cache) from `stats()` at scrape
        time."""
        self._stats = stats

    def _stat(self, key: str) -> float:
        if self._stats is None:
            return 0.0
        try:
            return float(self._stats().get(key, 0))
        except Exception:  # a scrape must never fail because the engine is mid-change
            return 0.0

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
