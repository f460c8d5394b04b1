"""The gateway's metrics (`recsys_gateway_…`), created once per process."""

from __future__ import annotations

from functools import cache

from services.common.metrics import ServiceMetrics


class GatewayMetrics:
    def __init__(self) -> None:
        metrics = ServiceMetrics("gateway")
        self.recommendations = metrics.counter(
            "recommendations_total",
            "Recommend answers by scene, experiment arm and outcome (full, degraded).",
            ("scene", "arm", "outcome"),
        )
        self.new_item_impressions = metrics.counter(
            "new_item_impressions_total",
            "New items shown (answers that are not dry runs), by scene and experiment arm: items of the "
            "live catalogue upserted less than the scene's new_items.max_age ago.",
            ("scene", "arm"),
        )
        self.degraded = metrics.counter(
            "degraded_total", "Degraded answers by reason (one answer may count several).", ("reason",)
        )
        self.stage_seconds = metrics.histogram("stage_seconds", "Time spent per pipeline stage.", ("stage",))
        self.items_returned = metrics.histogram(
            "items_returned", "Items in a Recommend answer.", buckets=(0, 1, 5, 10, 20, 50, 100)
        )
        self.filtered = metrics.counter("filtered_items_total", "Candidates removed, by filter.", ("filter",))
        self.events = metrics.counter(
            "events_total",
            "Accepted events by type, scene and arm: clicks / impressions per arm reads an experiment.",
            ("type", "scene", "arm"),
        )
        self.event_rejects = metrics.counter(
            "event_rejects_total", "Events refused, by the field at fault.", ("field",)
        )
        self.event_duplicates = metrics.counter("event_duplicates_total", "Events already applied (retries).")
        self.side_effect_errors = metrics.counter(
            "side_effect_errors_total", "Exposure or cache writes that failed after answering.", ("what",)
        )
        self.side_effects_dropped = metrics.counter(
            "side_effects_dropped_total",
            "Answers whose exposure and cache writes were dropped because the write queue was full.",
        )
        self.side_effects_queued = metrics.gauge(
            "side_effects_queued", "Answers whose after-answer writes wait in the queue.", (), "livesum"
        )
        self.http_requests = metrics.counter(
            "http_requests_total",
            "HTTP/JSON requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.http_seconds = metrics.histogram(
            "http_request_seconds", "HTTP/JSON request latency by route and method.", ("route", "method")
        )
        self.breaker_state = metrics.gauge(
            "breaker_state", "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open.", ("dependency",)
        )


@cache
def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics()
