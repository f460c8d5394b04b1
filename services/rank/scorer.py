"""`OnnxScorer`: many calls' candidates scored in one onnxruntime run.

Each call brings one user's inputs (a batch of one) and its candidates. The rows of every
call are concatenated: user inputs repeated per candidate, item features gathered in one
fancy-indexing pass, cross features computed from each call's own history and user vector
(`CrossFeatures.compute_one_user`). One session run scores everything and the outputs are
split back by call.
The features are those `recsys.serving_model.ServingModel.score` builds (the code offline
evaluation runs), only assembled for several users at once.

Runs in an inference thread, never on the event loop (onnxruntime and numpy release the GIL
for the heavy parts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.artifacts import FloatArray, Int64Array
from recsys.catalogue import NewItems
from recsys.errors import NotReady
from recsys.features import Inputs, Provenance
from recsys.serving_model import ServingModel


@dataclass(frozen=True, eq=False)
class ScoreJob:
    """One call's share of a batch."""

    model: ServingModel
    user: Inputs  # the user's ranker inputs, a batch of one
    items: Int64Array  # candidate item indexes (unknown ones get default features)
    embedding: FloatArray | None  # recall's user embedding; None: the user tower computes it
    deadline: float | None = None  # time.monotonic() after which nobody waits for the scores
    provenance: Provenance | None = None  # recall's, aligned with `items`
    # With tracing on: the call's server span (an opentelemetry Span), which the batch's span
    # is parented by or linked to; None when tracing is off.
    span: Any = None
    new_items: NewItems | None = None  # the live catalogue on `model`'s version, when not empty

    @property
    def rows(self) -> int:
        return int(self.items.shape[0])


@dataclass(frozen=True)
class ScoredBatch:
    scores: list[dict[str, FloatArray]]  # per job: head → probabilities aligned with its items
    feature_seconds: float  # wall time
    inference_seconds: float  # wall time
    # The same two as this thread's CPU time: what the work cost, free of the time the thread
    # waited for a core or the GIL (the benchmark's overhead figures subtract these).
    feature_cpu_seconds: float
    inference_cpu_seconds: float
    # time.perf_counter() at the start, at the ranker run's start and at its end: the batch's
    # feature-assembly and onnxruntime spans with tracing on (read anyway, so free when off).
    started: float = 0.0
    run_started: float = 0.0
    finished: float = 0.0


class OnnxScorer:
    identifier = "onnx_ranker"

    def score(self, model: ServingModel, jobs: Sequence[ScoreJob]) -> ScoredBatch:
        """Score jobs that all use `model` (one version) in one ranker run."""
        ranker = model.ranker
        if ranker is None:
            raise NotReady(f"version {model.version} is retrieval-only: it has no ranker")
        started, started_cpu = time.perf_counter(), time.thread_time()
        inference = inference_cpu = 0.0
        counts = np.fromiter((job.rows for job in jobs), dtype=np.int64, count=len(jobs))
        single = len(jobs) == 1
        if single:
            user = jobs[0].user
            items = jobs[0].items
        else:
            user = {name: np.concatenate([job.user[name] for job in jobs]) for name in jobs[0].user}
            items = np.concatenate([job.items for job in jobs])
        batch = {name: np.repeat(value, counts, axis=0) for name, value in user.items()}
        batch.update(model.item_features.inputs(items))
        _new_item_features(batch, items, [job.new_items for job in jobs if job.new_items is not None])
        # Calls without recall's embedding get theirs from one user-tower run for all of them.
        without = [job.user for job in jobs if job.embedding is None]
        computed: Iterator[FloatArray] = iter(())
        if without:
            tower_started, tower_cpu = time.perf_counter(), time.thread_time()
            computed = iter(model.user_embeddings(without))
            inference += time.perf_counter() - tower_started
            inference_cpu += time.thread_time() - tower_cpu
        vectors = [job.embedding if job.embedding is not None else next(computed) for job in jobs]
        # Each call's cross features from its own history (cheap: one history against its
        # candidates, see CrossFeatures.compute_one_user), then stacked like the other inputs.
        cross = model.cross_features
        if single:
            batch.update(
                cross.inputs(user["history"], user["history_weight"], items, vectors[0], one_user=True)
            )
        else:
            parts = [
                cross.inputs(
                    job.user["history"], job.user["history_weight"], job.items, vector, one_user=True
                )
                for job, vector in zip(jobs, vectors, strict=True)
            ]
            batch.update({name: np.concatenate([part[name] for part in parts]) for name in parts[0]})
        if model.spec.provenance_channels:
            parts_provenance = [model.provenance_inputs(job.provenance, job.rows) for job in jobs]
            batch["provenance"] = parts_provenance[0] if single else np.concatenate(parts_provenance)
        run_started, run_cpu = time.perf_counter(), time.thread_time()
        outputs = ranker.run(batch)
        finished, finished_cpu = time.perf_counter(), time.thread_time()
        inference += finished - run_started
        inference_cpu += finished_cpu - run_cpu
        heads = model.spec.heads
        flat = {head: np.asarray(outputs[head], dtype=np.float32).reshape(-1) for head in heads}
        if single:
            scores = [flat]
        else:
            bounds = np.cumsum(counts)[:-1]
            split = {head: np.split(values, bounds) for head, values in flat.items()}
            scores = [{head: split[head][position] for head in heads} for position in range(len(jobs))]
        return ScoredBatch(
            scores,
            finished - started - inference,
            inference,
            finished_cpu - started_cpu - inference_cpu,
            inference_cpu,
            started,
            run_started,
            finished,
        )


def _new_item_features(batch: Inputs, items: Int64Array, views: Sequence[NewItems]) -> None:
    """Content features for items upserted while serving: their categories and author as the
    version's tokens (from their metadata), where `ItemFeatures` gave an unknown index token 0
    everywhere. The id-based inputs keep their defaults for unknown items (item token 0, zero
    statistics, no neighbours, a zero item vector), which the ranker was trained to read as
    "never seen". The calls of one batch share a version; of their layouts the newest wins
    (ordinals never change, only metadata could)."""
    if not views:
        return
    view = max(views, key=lambda candidate: candidate.revision)
    new = view.is_new(items)
    if not new.any():
        return
    ordinals = np.asarray(items, dtype=np.int64)[new] - view.base
    categories = batch["categories"]
    width = min(categories.shape[1], view.categories.shape[1])
    categories[new, :width] = view.categories[ordinals, :width]
    batch["author"][new] = view.authors[ordinals]
