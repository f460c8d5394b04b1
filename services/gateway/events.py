"""ReportEvents: validate each event, skip retried ones, apply the rest to the feature store
(live history and consumed set; exposures for impressions), append them to the durable log and
count them per scene and experiment arm. No gRPC here."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recsys.feature_store import EVENT_KINDS, FeatureStore, LiveEvent
from recsys.feature_store.event_log import EventLog, LoggedEvent
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("recsys.gateway")

MAX_ID_LENGTH = 512
# Events from further in the future than this are refused (clock skew is tolerated up to it).
MAX_FUTURE_SECONDS = 300.0


@dataclass(frozen=True)
class IncomingEvent:
    """One event as the client sent it (the servicer's and the HTTP handler's common form)."""

    event_id: str
    user_id: str
    item_id: str
    type: str  # "" when unspecified
    value: float
    time: float  # unix seconds; 0 → now
    request_id: str = ""
    scene: str = ""
    position: int = 0
    arm: str = ""


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str
    field: str
    reason: str


@dataclass(frozen=True)
class EventsOutcome:
    accepted: int
    duplicates: int
    rejections: list[Rejection]


class EventIngestor:
    def __init__(
        self,
        features: FeatureStore,
        event_log: EventLog,
        metrics: GatewayMetrics,
        *,
        known_item: Callable[[str], bool],
        dedupe_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._features = features
        self._log = event_log
        self._metrics = metrics
        self._known_item = known_item
        self._dedupe_seconds = dedupe_seconds
        self._clock = clock

    def _problem(self, event: IncomingEvent, now: float) -> tuple[str, str] | None:
        """(field, reason) of the first thing wrong with the event, or None."""
        if not event.user_id:
            return "user_id", "must not be empty"
        if len(event.user_id) > MAX_ID_LENGTH:
            return "user_id", f"longer than {MAX_ID_LENGTH} characters"
        if not event.item_id:
            return "item_id", "must not be empty"
        if not self._known_item(event.item_id):
            return "item_id", f"unknown item {event.item_id!r}"
        if event.type not in EVENT_KINDS:
            return "type", f"must be one of {', '.join(EVENT_KINDS)}"
        if len(event.event_id) > MAX_ID_LENGTH:
            return "event_id", f"longer than {MAX_ID_LENGTH} characters"
        if not math.isfinite(event.value):
            return "value", "must be a finite number"
        if event.type == "rating" and event.value == 0:
            return "value", "a rating needs its value"
        if event.time < 0 or not math.isfinite(event.time):
            return "time", "must be a unix time"
        if event.time > now + MAX_FUTURE_SECONDS:
            return "time", "is in the future"
        if event.position < 0:
            return "position", "must be >= 0"
        return None

    async def ingest(self, events: Sequence[IncomingEvent]) -> EventsOutcome:
        now = self._clock()
        rejections: list[Rejection] = []
        valid: list[tuple[int, IncomingEvent]] = []
        for index, event in enumerate(events):
            problem = self._problem(event, now)
            if problem is None:
                valid.append((index, event))
            else:
                field, reason = problem
                rejections.append(Rejection(index, event.event_id, field, reason))
                self._metrics.event_rejects.labels(field).inc()
        # An event without an id cannot be recognised when retried: it gets one of its own.
        with_ids = [
            (index, event if event.event_id else dataclasses.replace(event, event_id=_new_event_id()))
            for index, event in valid
        ]
        first = await self._features.mark_events_seen(
            [event.event_id for _, event in with_ids], self._dedupe_seconds
        )
        fresh = [event for (_, event), is_new in zip(with_ids, first, strict=True) if is_new]
        duplicates = len(with_ids) - len(fresh)
        self._metrics.event_duplicates.inc(duplicates)

        try:
            await self._apply(fresh, now)
        except BaseException:
            # Marked as seen but not (wholly) applied: release the ids so the client's retry
            # applies them (appends may then repeat, never go missing).
            await self._features.forget_events([event.event_id for event in fresh])
            raise
        for event in fresh:
            self._metrics.events.labels(event.type, event.scene or "default", event.arm or "none").inc()
        return EventsOutcome(len(fresh), duplicates, rejections)

    async def _apply(self, fresh: Sequence[IncomingEvent], now: float) -> None:
        by_user: dict[str, list[IncomingEvent]] = defaultdict(list)
        for event in fresh:
            by_user[event.user_id].append(event)
        for user_id, user_events in by_user.items():
            live = [
                LiveEvent(e.item_id, e.type, _value(e), e.time or now, e.event_id)
                for e in user_events
                if e.type != "impression"
            ]
            await self._features.append_events(user_id, live)
            shown = [e.item_id for e in user_events if e.type == "impression"]
            if shown:
                await self._features.record_exposures(user_id, shown, now)
        await self._log.append(
            [
                LoggedEvent(
                    e.time or now,
                    e.user_id,
                    e.item_id,
                    e.type,
                    _value(e),
                    e.event_id,
                    e.request_id,
                    e.scene,
                    e.position,
                    e.arm,
                )
                for e in fresh
            ]
        )


def _value(event: IncomingEvent) -> float:
    """The rating for a rating, else a weight of 1 unless one was given."""
    return event.value if event.type == "rating" or event.value else 1.0


def _new_event_id() -> str:
    return f"gw-{uuid.uuid4().hex}"
