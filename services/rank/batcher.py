"""`MicroBatcher`: concurrent calls scored together in one onnxruntime run, split back.

A call hands its `ScoreJob` to `score()` and awaits its own future. A collector task takes
the pending jobs as one batch (at most `max_rows` rows, a larger single call alone) and
scores it in the inference thread; while that runs, new calls queue up and form the next
batch. Before starting a batch the collector waits for companions — but only for calls
already on their way (announced with `expect()`, still reading features) and for at most
`window` seconds after the oldest pending call arrived. A lone call is never delayed: at
concurrency 1 the window would be pure latency. Jobs of different model versions (during a
swap) are scored in separate runs of the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from recsys.artifacts import FloatArray
from recsys.errors import DeadlineExpired
from recsys.serving_model import ServingModel
from services.common.metrics import EXPIRED_WORK
from services.common.tracing import Tracing
from services.rank.metrics import RankMetrics
from services.rank.scorer import OnnxScorer, ScoredBatch, ScoreJob

log = logging.getLogger("recsys.rank")

TaskScores = dict[str, FloatArray]


@dataclass(eq=False)
class _Pending:
    job: ScoreJob
    future: asyncio.Future[TaskScores]
    queued: float  # time.perf_counter()


@dataclass(frozen=True)
class _Group:
    model: ServingModel
    pending: list[_Pending]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MicroBatcher:
    def __init__(
        self,
        scorer: OnnxScorer,
        executor: Executor,
        metrics: RankMetrics,
        *,
        window: float = 0.0005,
        max_rows: int = 2048,
        collectors: int = 1,
    ) -> None:
        self._scorer = scorer
        self._executor = executor
        self._metrics = metrics
        self.window = window
        self.max_rows = max_rows
        self._collectors = collectors
        self._pending: deque[_Pending] = deque()
        self._rows = 0
        self._expected = 0  # calls announced (reading features) but not yet submitted
        self._waiters: set[asyncio.Future[None]] = set()  # idle or waiting collectors
        self._tasks: list[asyncio.Task[None]] = []
        self.tracing: Tracing | None = None  # set when tracing is on (RankApp.attach_tracing)

    # -- the calls' side -------------------------------------------------------------------
    def expect(self) -> None:
        """A call will submit a job soon: a batch about to start may wait for it."""
        self._expected += 1

    def unexpect(self) -> None:
        """An announced call will not submit after all (it failed before scoring)."""
        self._expected -= 1

    async def score(self, job: ScoreJob, *, expected: bool = False) -> TaskScores:
        """Every head's probabilities for the job's items (`expected`: the call announced
        itself with `expect()`)."""
        if not self._tasks:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        if expected:
            self._expected -= 1
        future: asyncio.Future[TaskScores] = loop.create_future()
        self._pending.append(_Pending(job, future, time.perf_counter()))
        self._rows += job.rows
        for waiter in self._waiters:
            _wake(waiter)
        return await future

    # -- the collectors' side ----------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._collect(), name=f"rank-batcher-{index}")
            for index in range(self._collectors)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._pending:
            waiting = self._pending.popleft()
            if not waiting.future.done():
                waiting.future.cancel()
        self._tasks = []

    async def _sleep_until_woken(self, at_most: float | None) -> None:
        loop = asyncio.get_running_loop()
        wakeup: asyncio.Future[None] = loop.create_future()
        self._waiters.add(wakeup)
        timer = None if at_most is None else loop.call_later(at_most, _wake, wakeup)
        try:
            await wakeup
        finally:
            self._waiters.discard(wakeup)
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                await self._sleep_until_woken(None)
            deadline = self._pending[0].queued + self.window
            while self._rows < self.max_rows and self._expected > 0:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                await self._sleep_until_woken(remaining)
            batch = self._take()
            if not batch:
                continue
            try:
                await self._run(batch)
            except Exception as error:  # the collector must survive, or every later call would hang
                log.exception("a batch failed outside scoring")
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            waiting = self._pending[0]
            if batch and rows + waiting.job.rows > self.max_rows:
                break
            self._pending.popleft()
            self._rows -= waiting.job.rows
            if waiting.future.done():  # the caller went away (deadline, cancellation)
                EXPIRED_WORK.labels("rank", "batch").inc()
                continue
            deadline = waiting.job.deadline
            if deadline is not None and time.monotonic() >= deadline:  # nobody waits for it
                EXPIRED_WORK.labels("rank", "batch").inc()
                waiting.future.set_exception(DeadlineExpired("the call's deadline passed in the batch queue"))
                continue
            batch.append(waiting)
            rows += waiting.job.rows
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        groups: dict[int, _Group] = {}
        for waiting in batch:
            model = waiting.job.model
            group = groups.get(id(model))
            if group is None:
                groups[id(model)] = group = _Group(model, [])
            group.pending.append(waiting)
        for group in groups.values():
            jobs = [waiting.job for waiting in group.pending]
            try:
                scored = await loop.run_in_executor(self._executor, self._scorer.score, group.model, jobs)
            except Exception as error:  # a bug or a broken model: every call of the run fails
                log.exception("scoring a batch failed", extra={"version": group.model.version})
                for waiting in group.pending:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            try:
                self._record(group.model.version, group.pending, jobs, scored, started)
                if self.tracing is not None:
                    self._trace(self.tracing, group.model.version, jobs, scored, started)
            except Exception:  # metrics must never cost a call its answer
                log.exception("recording batch metrics failed")
            for waiting, scores in zip(group.pending, scored.scores, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(scores)

    @staticmethod
    def _trace(
        tracing: Tracing, version: str, jobs: Sequence[ScoreJob], scored: ScoredBatch, started: float
    ) -> None:
        """The run's spans, recorded once it is done (it ran in the inference thread): one
        `rank.batch` span parented by the first sampled call's server span and linked to every
        sampled call's, so each call's trace reaches the batch that served it; under it the
        feature assembly (the user tower included, for calls without recall's embedding) and the
        onnxruntime run. A batch of calls none of which is sampled records nothing."""
        calls = [job.span for job in jobs if job.span is not None and job.span.is_recording()]
        if not calls:
            return
        rows = sum(job.rows for job in jobs)
        sizes = {"recsys.batch.calls": len(jobs), "recsys.batch.rows": rows}
        for span in calls:  # still open: each call awaits its scores
            span.set_attributes(sizes)
        batch = tracing.record_span(
            "rank.batch",
            started,
            time.perf_counter(),
            {**sizes, "recsys.model_version": version},
            parent=calls[0],
            links=calls,
        )
        tracing.record_span("rank.feature_assembly", scored.started, scored.run_started, sizes, parent=batch)
        tracing.record_span("onnxruntime.run", scored.run_started, scored.finished, sizes, parent=batch)

    def _record(
        self,
        version: str,
        pending: Sequence[_Pending],
        jobs: Sequence[ScoreJob],
        scored: ScoredBatch,
        started: float,
    ) -> None:
        metrics = self._metrics.version(version)
        rows = sum(job.rows for job in jobs)
        metrics.batch_calls.observe(len(jobs))
        metrics.batch_rows.observe(rows)
        metrics.inference.observe(scored.inference_seconds)
        metrics.features.observe(scored.feature_seconds)
        metrics.inference_cpu.inc(scored.inference_cpu_seconds)
        metrics.features_cpu.inc(scored.feature_cpu_seconds)
        metrics.rows.inc(rows)
        for waiting in pending:
            metrics.queue_wait.observe(max(0.0, started - waiting.queued))
