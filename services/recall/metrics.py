"""The recall service's metrics (`recsys_recall_…`), created once per process."""

from __future__ import annotations

from functools import cache

from recsys.serving_model import ALL_CHANNELS
from services.common.metrics import ServiceMetrics


class RecallMetrics:
    def __init__(self) -> None:
        metrics = ServiceMetrics("recall")
        self.channel_seconds = metrics.histogram(
            "channel_seconds", "Time each recall channel took (finished ones).", ("channel",)
        )
        self.channel_outcomes = metrics.counter(
            "channel_outcomes_total", "Channel runs by outcome (ok, timeout, error).", ("channel", "outcome")
        )
        self.channel_candidates = metrics.histogram(
            "channel_candidates",
            "Candidates a channel returned (after filters, within its quota).",
            ("channel",),
            buckets=(0, 10, 50, 100, 200, 500, 1000),
        )
        self.filtered = metrics.counter(
            "filtered_items_total", "Candidates removed, by filter and channel.", ("filter", "channel")
        )
        self.feature_store_errors = metrics.counter(
            "feature_store_errors_total", "Feature store reads that failed or timed out.", ("error",)
        )
        self.cold_start = metrics.counter("cold_start_total", "Requests answered by the cold-start channels.")
        self.prerank_items = metrics.counter(
            "prerank_items_total", "Merged candidates into and out of recall's pre-rank.", ("direction",)
        )
        # Label children bound once: `.labels()` costs more than the increment it precedes,
        # and a request touches these a dozen times.
        self.channel_timer = {name: self.channel_seconds.labels(name) for name in ALL_CHANNELS}
        self.channel_count = {name: self.channel_candidates.labels(name) for name in ALL_CHANNELS}
        self.outcome = {
            (name, outcome): self.channel_outcomes.labels(name, outcome)
            for name in ALL_CHANNELS
            for outcome in ("ok", "timeout", "error")
        }
        self.exposure_filtered = {name: self.filtered.labels("exposure", name) for name in ALL_CHANNELS}
        self.blocklist_filtered = {name: self.filtered.labels("blocklist", name) for name in ALL_CHANNELS}
        self.prerank_in = self.prerank_items.labels("in")
        self.prerank_kept = self.prerank_items.labels("kept")


@cache
def recall_metrics() -> RecallMetrics:
    return RecallMetrics()
