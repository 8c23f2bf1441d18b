"""Prometheus metrics of the HTTP service (``GET /metrics``, Prometheus' text format), one
``CollectorRegistry`` per app (not prometheus-client's global one: two apps in a process, e.g.
tests, keep their own counts).

Measured by the HTTP layer (``Metrics``):
    textgen_http_requests_total{route, status}         requests answered
    textgen_http_request_duration_seconds{route}       request received -> response complete
    textgen_time_to_first_char_seconds{route}          streams: admission -> first characters sent
    textgen_rejections_total{status, reason}           429 (rows, prefill_chars), 503 (shutting_down)
Read from ``Engine.stats()`` at scrape time (``EngineCollector``: nothing added to the engine loop):
    textgen_rows_in_flight, textgen_rows_decoding, textgen_max_rows, textgen_requests_in_flight,
    textgen_prefill_chars_queued, textgen_engine_ready                          (gauges)
    textgen_chars_generated_total, textgen_engine_steps_total,
    textgen_engine_row_steps_total (rows summed over steps: / steps = mean rows per step),
    textgen_engine_requests_total{outcome}                                       (counters)

Routes outside ``ROUTES`` count as ``other`` (label values stay few whatever clients send).
"""

import time
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.engine import Engine

ROUTES = frozenset({"/", "/v1/generate", "/v1/completions", "/v1/models", "/v1/model", "/v1/stats", "/healthz",
                    "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"})
# Seconds: a first character comes in milliseconds, a whole request in up to minutes.
FIRST_CHAR_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GAUGES = {"rows_in_flight": "Rows (samples) admitted and not finished", "rows_decoding": "Rows in the batch now",
          "max_rows": "The in-flight limit (rows)", "requests_in_flight": "Requests admitted and not finished",
          "prefill_chars_queued": "Prompt characters admitted and not consumed yet"}
COUNTERS = {"chars_generated": ("textgen_chars_generated", "Characters generated"),
            "steps": ("textgen_engine_steps", "Engine iterations (one model call for every row in the batch)"),
            "row_steps": ("textgen_engine_row_steps", "Rows summed over engine iterations")}
OUTCOMES = ("completed", "cancelled", "rejected", "failed")


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


class EngineCollector(Collector):
    """The engine's counters as metrics, read when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        if engine is None:
            return
        s = engine.stats()
        yield GaugeMetricFamily("textgen_engine_ready", "1 while the engine accepts requests", value=int(s["ready"]))
        for key, doc in GAUGES.items():
            yield GaugeMetricFamily(f"textgen_{key}", doc, value=s[key])
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=s[key])
        outcomes = CounterMetricFamily("textgen_engine_requests", "Engine requests by outcome", labels=["outcome"])
        outcomes.add_metric(["admitted"], s["requests_total"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], s[f"requests_{outcome}"])
        yield outcomes


class Metrics:
    """The registry of one app and the metrics its HTTP layer records."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("textgen_http_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.duration = Histogram("textgen_http_request_duration_seconds", "Request received -> response complete",
                                  ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.first_char = Histogram("textgen_time_to_first_char_seconds", "Streams: admission -> first characters "
                                    "sent", ["route"], buckets=FIRST_CHAR_BUCKETS, registry=r)
        self.rejections = Counter("textgen_rejections", "Requests refused for load or shutdown",
                                  ["status", "reason"], registry=r)
        r.register(EngineCollector(engine))

    def first_chars(self, route: str, started: float) -> None:
        """A stream sent its first characters (``started``: ``time.monotonic()`` at admission)."""
        self.first_char.labels(route).observe(time.monotonic() - started)

    def rejected(self, status: int, reason: str) -> None:
        self.rejections.labels(str(status), reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Instrumented:
    """ASGI middleware: every HTTP request's route, status and duration into ``Metrics``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = self._timed if scope["type"] == "http" else self.app
        await run(scope, receive, send)

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, status = time.perf_counter(), [0]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = route_of(scope["path"])
            self.metrics.requests.labels(route, str(status[0] or 500)).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - started)
