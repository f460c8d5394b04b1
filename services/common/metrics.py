"""Prometheus metrics: the gRPC server metrics operators know, and per-service helpers.

The gRPC metrics carry the names and labels of go-grpc-prometheus, so existing dashboards
and alerts work unchanged:
  grpc_server_started_total{grpc_type,grpc_service,grpc_method}
  grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
  grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}  (histogram)
Service metrics are named `recsys_<service>_<what>_<unit>` via `ServiceMetrics`.

Several workers (`--workers N`) share one scrape port through prometheus_client's
multiprocess mode: `services.common.workers` sets PROMETHEUS_MULTIPROC_DIR before the
workers start, each worker writes its samples there, and the supervisor serves the sum
(counters and histograms add up across workers; gauges say how in their `multiprocess_mode`).
With one worker the process serves its own registry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

# go-grpc-prometheus has no `_created` series; they would only double what operators scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Latency buckets for a recommender: most calls take milliseconds, a few take up to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server, in seconds.",
    _GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "recsys_server_in_flight_calls",
    "Calls being handled now (per process; summed over live workers).",
    ("service",),
    multiprocess_mode="livesum",
)
SHED_TOTAL = Counter(
    "recsys_server_shed_total",
    "Calls refused with RESOURCE_EXHAUSTED by admission control (see recsys_server_shed_reasons_total).",
    ("service",),
)
CONCURRENCY_LIMIT = Gauge(
    "recsys_server_concurrency_limit",
    "The adaptive admission limit: calls a process works on at once (summed over live workers).",
    ("service",),
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "recsys_server_queued_calls",
    "Calls waiting for an admission slot (summed over live workers).",
    ("service",),
    multiprocess_mode="livesum",
)
QUEUE_WAIT_SECONDS = Histogram(
    "recsys_server_queue_wait_seconds",
    "How long admitted calls waited for a slot.",
    ("service",),
    buckets=LATENCY_BUCKETS,
)
SHED_REASONS = Counter(
    "recsys_server_shed_reasons_total",
    "Calls refused with RESOURCE_EXHAUSTED, by why: queue_full (the expected wait exceeds the"
    " queue's bound), deadline (exceeds the call's own deadline), queue_timeout (no slot in time).",
    ("service", "reason"),
)
EXPIRED_WORK = Counter(
    "recsys_server_expired_work_total",
    "Work dropped at a stage boundary because its caller's deadline had passed (or it went away).",
    ("service", "stage"),
)
SERVING = Gauge(
    "recsys_server_serving",
    "1 when the process reports SERVING on its health service.",
    ("service",),
    multiprocess_mode="livemax",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
GaugeMode = Literal["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent"]


class ServiceMetrics:
    """Creates metrics named `recsys_<service>_<name>` (create each once per process)."""

    def __init__(self, service: str) -> None:
        if not _NAME.match(service):
            raise ValueError(f"service: {service!r} is not a lowercase metric-name fragment")
        self.service = service

    def _name(self, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"name: {name!r} is not a lowercase metric-name fragment")
        return f"recsys_{self.service}_{name}"

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(self._name(name), documentation, labels)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(self._name(name), documentation, labels, buckets=buckets)

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        multiprocess_mode: GaugeMode = "livemax",
    ) -> Gauge:
        return Gauge(self._name(name), documentation, labels, multiprocess_mode=multiprocess_mode)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class MetricsServer:
    """A running /metrics endpoint (a thread of prometheus_client's WSGI server)."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self.port = int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(host: str, port: int, *, aggregate: bool = False) -> MetricsServer:
    """Serve /metrics on host:port (0 → a free port).

    `aggregate=True` (the supervisor of several workers) serves the sum of the workers'
    samples from the multiprocess directory instead of this process's own registry.
    """
    registry: CollectorRegistry = REGISTRY
    if aggregate:
        directory = multiprocess_dir()
        if directory is None:
            raise RuntimeError("aggregate metrics need PROMETHEUS_MULTIPROC_DIR")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server)
