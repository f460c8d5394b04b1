"""The rank service's metrics (`recsys_rank_…`), created once per process.

Scoring metrics carry the model version, so a new version's batch sizes, inference time and
rows/s can be compared with the old one's during a rollout."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Histogram

from services.common.metrics import ServiceMetrics

_CALLS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_ROWS_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Scoring is sub-millisecond to a few milliseconds: finer than the default latency buckets.
_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class VersionChildren:
    """One version's label children, bound once (`.labels()` costs more than an observe)."""

    batch_calls: Histogram
    batch_rows: Histogram
    queue_wait: Histogram
    inference: Histogram
    features: Histogram
    inference_cpu: Counter
    features_cpu: Counter
    rows: Counter
    unknown_users: Counter
    unknown_items: Counter


class RankMetrics:
    def __init__(self) -> None:
        metrics = ServiceMetrics("rank")
        self.batch_calls = metrics.histogram(
            "batch_size_calls", "Calls scored together in one onnxruntime run.", ("version",), _CALLS_BUCKETS
        )
        self.batch_rows = metrics.histogram(
            "batch_size_rows", "Rows (candidates) scored in one onnxruntime run.", ("version",), _ROWS_BUCKETS
        )
        self.queue_wait = metrics.histogram(
            "queue_wait_seconds", "Time a call waited for its batch to start.", ("version",), _SECONDS_BUCKETS
        )
        self.inference = metrics.histogram(
            "inference_seconds",
            "onnxruntime time of one batch (ranker, and the user tower when recall sent no embedding).",
            ("version",),
            _SECONDS_BUCKETS,
        )
        self.features = metrics.histogram(
            "feature_assembly_seconds",
            "Time to gather one batch's item, user and cross features into the ranker's inputs.",
            ("version",),
            _SECONDS_BUCKETS,
        )
        self.inference_cpu = metrics.counter(
            "inference_cpu_seconds_total",
            "CPU time of the inference thread in onnxruntime runs.",
            ("version",),
        )
        self.features_cpu = metrics.counter(
            "feature_assembly_cpu_seconds_total",
            "CPU time of the inference thread assembling inputs.",
            ("version",),
        )
        self.rows = metrics.counter(
            "scored_rows_total", "Rows scored by the ranker (rate: rows/s).", ("version",)
        )
        self.unknown_users = metrics.counter(
            "unknown_users_total",
            "Calls for a user the version does not know (default features).",
            ("version",),
        )
        self.unknown_items = metrics.counter(
            "unknown_items_total", "Candidates the version does not know (default features).", ("version",)
        )
        self.prerank_items = metrics.counter(
            "prerank_items_total", "Candidates into and out of pre-rank.", ("direction",)
        )
        self.feature_store_errors = metrics.counter(
            "feature_store_errors_total", "Feature store reads that failed or timed out.", ("error",)
        )
        self.nonfinite_scores = metrics.counter(
            "nonfinite_scores_total", "Calls refused because the model gave non-finite scores."
        )
        self.without_provenance = metrics.counter(
            "without_provenance_total",
            "Calls scored without recall's provenance by a ranker that reads it (a direct caller, "
            "or a gateway too old to forward it): their candidates read as found by no channel.",
        )
        self.prerank_in = self.prerank_items.labels("in")
        self.prerank_kept = self.prerank_items.labels("kept")
        self._children: dict[str, VersionChildren] = {}

    def version(self, version: str) -> VersionChildren:
        children = self._children.get(version)
        if children is None:
            children = VersionChildren(
                self.batch_calls.labels(version),
                self.batch_rows.labels(version),
                self.queue_wait.labels(version),
                self.inference.labels(version),
                self.features.labels(version),
                self.inference_cpu.labels(version),
                self.features_cpu.labels(version),
                self.rows.labels(version),
                self.unknown_users.labels(version),
                self.unknown_items.labels(version),
            )
            self._children[version] = children
        return children

    def retire(self, version: str) -> None:
        """Drop a version's series once it can no longer serve: versions come and go for the
        life of the process, and their series must not pile up in every scrape."""
        if self._children.pop(version, None) is None:
            return
        for metric in (
            self.batch_calls,
            self.batch_rows,
            self.queue_wait,
            self.inference,
            self.features,
            self.inference_cpu,
            self.features_cpu,
            self.rows,
            self.unknown_users,
            self.unknown_items,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(version)


@cache
def rank_metrics() -> RankMetrics:
    return RankMetrics()
