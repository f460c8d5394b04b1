"""`AnswerRecorder`: the writes after an answer (the shown items as exposures, the ranked but
unshown ones for the cache channel, the impressions of the new items shown), off the
request's latency and bounded.

A fixed queue drained by a few writer tasks: under a burst, or with a slow Redis, the writes
wait there instead of piling up as one task per answer (unbounded memory, and Redis buried
by the backlog just when it is slow). When the queue is full the answer's writes are dropped
and counted: an exposure not recorded only means the item may be shown once more, which is
cheaper than holding every answer's writes without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from recsys.feature_store import FeatureStore
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("recsys.gateway")


@dataclass(frozen=True)
class AnswerWrites:
    user_id: str
    shown: list[str]
    unshown: list[tuple[str, float]]
    now: float
    new_items: list[str] = field(default_factory=list)  # the shown new items (impressions to count)


class AnswerRecorder:
    identifier = "answer_recorder"

    def __init__(
        self, features: FeatureStore, metrics: GatewayMetrics, *, capacity: int = 2000, writers: int = 4
    ) -> None:
        if capacity < 1 or writers < 1:
            raise ValueError(f"capacity and writers: must be at least 1, got {capacity}, {writers}")
        self._features = features
        self._metrics = metrics
        self._writers = writers
        self._queue: asyncio.Queue[AnswerWrites] = asyncio.Queue(capacity)
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    def submit(self, writes: AnswerWrites) -> bool:
        """Queue an answer's writes; False (counted) when the queue is full."""
        if not self._tasks:  # started on first use: the writers need the running loop
            self._tasks = [
                asyncio.get_running_loop().create_task(self._write_forever(), name=f"answer-writer-{n}")
                for n in range(self._writers)
            ]
        try:
            self._queue.put_nowait(writes)
        except asyncio.QueueFull:
            self.dropped += 1
            self._metrics.side_effects_dropped.inc()
            return False
        self._metrics.side_effects_queued.set(self._queue.qsize())
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _write_forever(self) -> None:
        while True:
            writes = await self._queue.get()
            try:
                await self._write(writes)
            finally:
                self._queue.task_done()
                self._metrics.side_effects_queued.set(self._queue.qsize())

    async def _write(self, writes: AnswerWrites) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("exposures", lambda: self._features.record_exposures(writes.user_id, writes.shown, writes.now)),
            ("cache", lambda: self._features.put_cache(writes.user_id, writes.unshown, writes.now)),
        ]
        if writes.new_items:
            counts = dict.fromkeys(writes.new_items, 1)
            steps.append(("new_item_impressions", lambda: self._features.add_item_impressions(counts)))
        for what, write in steps:  # one after the other: a user's writes stay ordered
            try:
                await write()
            except Exception as error:  # the answer is out; count and log, never raise
                self._metrics.side_effect_errors.labels(what).inc()
                log.warning("write after answering failed", extra={"what": what, "error": repr(error)})

    async def drain(self) -> None:
        """Finish the queued writes, then stop the writers (at shutdown)."""
        if self._tasks:
            await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
