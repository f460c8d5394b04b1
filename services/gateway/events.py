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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from recsys.feature_store import EVENT_KINDS, FeatureStore, LiveEvent
from recsys.feature_store.event_log import EventLog, LoggedEvent
from recsys.limits import ID_CHARS, NAME_CHARS
from recsys.stages.sources import LOOK_ALIKE_ENGAGERS
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("recsys.gateway")

# The limits recsys.limits sets for recsys.v1.Event, for events that did not come through a
# proto edge (the checks are cheap, and they keep Redis and the log bounded either way).
_TEXT_LIMITS = (
    ("event_id", ID_CHARS),
    ("user_id", ID_CHARS),
    ("item_id", ID_CHARS),
    ("request_id", ID_CHARS),
    ("scene", NAME_CHARS),
    ("arm", NAME_CHARS),
)
# Events from further in the future than this are refused (clock skew is tolerated up to it).
MAX_FUTURE_SECONDS = 300.0
# How long one ReportEvents may keep retrying its feature-store writes (at most the caller's
# deadline, less WRITE_MARGIN_SECONDS): a planned Redis Cluster failover holds writes back for
# up to a few hundred ms, more than one write's budget (200 ms). The writes are idempotent, so
# a retry applies nothing twice (`RedisFeatureStore._write`).
WRITE_SECONDS = 1.0
# Kept back from the caller's deadline: to release the ids of events that could not be
# applied and answer UNAVAILABLE, rather than being cut off by the deadline mid-write.
WRITE_MARGIN_SECONDS = 0.05


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
    # What the edge found wrong with the message (a field past its limit), if anything.
    problem: tuple[str, str] | None = None


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
        scenes: Collection[str] = (),
        arms: Collection[str] = (),
        clock: Callable[[], float] = time.time,
        new_item: Callable[[str], bool] | None = None,
        engagers_per_item: int = LOOK_ALIKE_ENGAGERS,
        write_seconds: float = WRITE_SECONDS,
    ) -> None:
        """`new_item(item_id)`: whether the item is a new one of the live catalogue; a
        consuming event on one records its user as an engager (the look-alike channel's
        input, see `FeatureStore.record_engagers`), up to `engagers_per_item` per item.
        `write_seconds`: how long one call may retry its writes (see WRITE_SECONDS)."""
        if not write_seconds > 0:
            raise ValueError(f"write_seconds: expected seconds > 0, got {write_seconds!r}")
        self._write_seconds = write_seconds
        self._features = features
        self._new_item = new_item
        self._engagers_per_item = engagers_per_item
        self._log = event_log
        self._metrics = metrics
        self._known_item = known_item
        self._dedupe_seconds = dedupe_seconds
        self._clock = clock
        # Metric labels take configured values only: a client inventing scene or arm names
        # must not create series (each costs memory in every scrape, forever).
        self.set_label_values(scenes, arms)

    def set_label_values(self, scenes: Collection[str], arms: Collection[str]) -> None:
        """The scene and arm names the metrics may carry (others are counted as `other`):
        the configured ones, set again when the configuration files are reloaded."""
        self._scenes = frozenset(scenes)
        self._arms = frozenset(arms)

    def _problem(self, event: IncomingEvent, now: float) -> tuple[str, str] | None:
        """(field, reason) of the first thing wrong with the event, or None."""
        if event.problem is not None:
            return event.problem
        for name, most in _TEXT_LIMITS:
            length = len(getattr(event, name))
            if length > most:
                return name, f"at most {most} characters, got {length}"
        if not event.user_id:
            return "user_id", "must not be empty"
        if not event.item_id:
            return "item_id", "must not be empty"
        if not self._known_item(event.item_id):
            return "item_id", f"unknown item {event.item_id!r}"
        if event.type not in EVENT_KINDS:
            return "type", f"must be one of {', '.join(EVENT_KINDS)}"
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

    async def ingest(
        self, events: Sequence[IncomingEvent], time_remaining: float | None = None
    ) -> EventsOutcome:
        """`time_remaining`: the caller's deadline in seconds from now (None: it set none),
        which bounds how long the writes are retried."""
        now = self._clock()
        retry_seconds = self._write_seconds
        if time_remaining is not None:
            retry_seconds = min(retry_seconds, time_remaining - WRITE_MARGIN_SECONDS)
        deadline = time.monotonic() + retry_seconds
        rejections: list[Rejection] = []
        valid: list[tuple[int, IncomingEvent]] = []
        for index, event in enumerate(events):
            problem = self._problem(event, now)
            if problem is None:
                valid.append((index, event))
            else:
                field, reason = problem
                # The id is echoed back: cut, so an oversized one cannot make the answer huge.
                rejections.append(Rejection(index, event.event_id[:ID_CHARS], field, reason))
                self._metrics.event_rejects.labels(field).inc()
        # An event without an id cannot be recognised when retried: it gets one of its own.
        with_ids = [
            (index, event if event.event_id else dataclasses.replace(event, event_id=_new_event_id()))
            for index, event in valid
        ]
        first = await self._features.mark_events_seen(
            [seen_key(event) for _, event in with_ids], self._dedupe_seconds, deadline=deadline
        )
        fresh = [event for (_, event), is_new in zip(with_ids, first, strict=True) if is_new]
        duplicates = len(with_ids) - len(fresh)
        self._metrics.event_duplicates.inc(duplicates)

        try:
            await self._apply(fresh, now, deadline)
        except BaseException:
            # Marked as seen but not (wholly) applied: release the ids so the client's retry
            # applies them (appends may then repeat, never go missing). Retried within the
            # deadline too, if any of it is left.
            await self._features.forget_events([seen_key(event) for event in fresh], deadline=deadline)
            raise
        for event in fresh:
            self._metrics.events.labels(
                event.type, self._scene_label(event.scene), self._arm_label(event.arm)
            ).inc()
        return EventsOutcome(len(fresh), duplicates, rejections)

    def _scene_label(self, scene: str) -> str:
        if not scene:
            return "default"
        return scene if scene in self._scenes else "other"

    def _arm_label(self, arm: str) -> str:
        if not arm:
            return "none"
        return arm if arm in self._arms else "other"

    async def _apply(self, fresh: Sequence[IncomingEvent], now: float, deadline: float) -> None:
        by_user: dict[str, list[IncomingEvent]] = defaultdict(list)
        for event in fresh:
            by_user[event.user_id].append(event)
        for user_id, user_events in by_user.items():
            live = [
                LiveEvent(e.item_id, e.type, _value(e), e.time or now, e.event_id)
                for e in user_events
                if e.type != "impression"
            ]
            await self._features.append_events(user_id, live, deadline=deadline)
            shown = [e.item_id for e in user_events if e.type == "impression"]
            if shown:
                await self._features.record_exposures(user_id, shown, now, deadline=deadline)
        if self._new_item is not None:
            # Here, where events arrive, rather than in recall per request: one small script
            # per batch that touches new items, nothing otherwise. Ids, not vectors: each
            # model version's user tower embeds the engagers its own way (recall, off the
            # request path, `services.recall.look_alike`).
            engagements = [
                (e.item_id, e.user_id) for e in fresh if e.type != "impression" and self._new_item(e.item_id)
            ]
            if engagements:
                await self._features.record_engagers(engagements, self._engagers_per_item, deadline=deadline)
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
            ],
            deadline=deadline,
        )


def _value(event: IncomingEvent) -> float:
    """The rating for a rating, else a weight of 1 unless one was given."""
    return event.value if event.type == "rating" or event.value else 1.0


def seen_key(event: IncomingEvent) -> str:
    """The de-duplication key: event ids are chosen by clients, so they are unique per user at
    best (two shops' `order-42`); the length prefix keeps ("a:b", "c") and ("a", "b:c") apart."""
    return f"{len(event.user_id)}:{event.user_id}:{event.event_id}"


def _new_event_id() -> str:
    return f"gw-{uuid.uuid4().hex}"
