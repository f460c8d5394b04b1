"""What the client sends and gets back, as plain frozen dataclasses (no protobuf in sight).

Each result keeps the response message it was read from in `response`, for fields added to
the contract after this library learnt about it (and for `--json` output with the proto's
field names).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from recsys.v1 import catalogue_pb2, gateway_pb2

EventKind = Literal["impression", "click", "like", "rating", "consume"]

_EVENT_TYPES: dict[str, gateway_pb2.EventType.ValueType] = {
    "impression": gateway_pb2.EVENT_TYPE_IMPRESSION,
    "click": gateway_pb2.EVENT_TYPE_CLICK,
    "like": gateway_pb2.EVENT_TYPE_LIKE,
    "rating": gateway_pb2.EVENT_TYPE_RATING,
    "consume": gateway_pb2.EVENT_TYPE_CONSUME,
}


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    title: str
    score: float  # comparable only within one answer
    position: int  # 1-based display position
    channels: tuple[str, ...]  # recall channels that found it ("fallback" when recall was down)
    task_scores: Mapping[str, float]  # per ranking task; empty when ranking was skipped


@dataclass(frozen=True)
class StageTrace:
    stage: str
    candidates_in: int
    candidates_out: int
    milliseconds: float
    detail: str


@dataclass(frozen=True)
class Recommendation:
    """A Recommend answer. `degraded_reasons` empty means complete; otherwise the answer is
    still usable (gateway.proto lists the reasons; treat unknown ones as "degraded")."""

    items: tuple[RecommendedItem, ...]
    request_id: str
    model_version: str
    scene: str
    experiment: str
    arm: str
    degraded_reasons: tuple[str, ...]
    cold_start: bool
    trace: tuple[StageTrace, ...]
    response: gateway_pb2.RecommendResponse = field(repr=False, compare=False)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    @classmethod
    def from_proto(cls, response: gateway_pb2.RecommendResponse) -> Recommendation:
        return cls(
            items=tuple(
                RecommendedItem(
                    item.item_id,
                    item.title,
                    item.score,
                    item.position,
                    tuple(item.channels),
                    dict(item.task_scores),
                )
                for item in response.items
            ),
            request_id=response.request_id,
            model_version=response.model_version,
            scene=response.scene,
            experiment=response.experiment,
            arm=response.arm,
            degraded_reasons=tuple(response.degraded_reasons),
            cold_start=response.cold_start,
            trace=tuple(
                StageTrace(s.stage, s.candidates_in, s.candidates_out, s.milliseconds, s.detail)
                for s in response.trace
            ),
            response=response,
        )


@dataclass(frozen=True)
class Event:
    """One thing a user did. `event_id` makes a retried batch safe (the gateway applies an id
    once per user): when empty, the client makes one before the first attempt. `time` is unix
    seconds; None → now, taken when the event is sent. The attribution fields (`request_id`,
    `scene`, `arm`, `position`) come from the Recommend answer that showed the item."""

    user_id: str
    item_id: str
    type: EventKind
    value: float = 0.0  # the rating, for type "rating"
    event_id: str = ""
    time: float | None = None
    request_id: str = ""
    scene: str = ""
    arm: str = ""
    position: int = 0

    def to_proto(self, event_id: str) -> gateway_pb2.Event:
        if self.type not in _EVENT_TYPES:
            raise ValueError(f"type: expected one of {', '.join(_EVENT_TYPES)}, got {self.type!r}")
        message = gateway_pb2.Event(
            event_id=event_id,
            user_id=self.user_id,
            item_id=self.item_id,
            type=_EVENT_TYPES[self.type],
            value=self.value,
            request_id=self.request_id,
            scene=self.scene,
            arm=self.arm,
            position=self.position,
        )
        message.time.FromNanoseconds(int((time.time() if self.time is None else self.time) * 1e9))
        return message


@dataclass(frozen=True)
class Rejection:
    index: int  # of the event in the batch
    event_id: str
    field: str  # within the event, e.g. "item_id" (the event is `index`)
    reason: str


@dataclass(frozen=True)
class EventsReport:
    """A ReportEvents answer: each event accepted, rejected (with the field at fault) or a
    duplicate of one already applied (not an error: a retry that had reached the server)."""

    accepted: int
    rejected: int
    duplicates: int
    rejections: tuple[Rejection, ...]
    event_ids: tuple[str, ...]  # as sent, in batch order (made ones included)
    response: gateway_pb2.ReportEventsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(
        cls, response: gateway_pb2.ReportEventsResponse, event_ids: tuple[str, ...]
    ) -> EventsReport:
        return cls(
            accepted=response.accepted,
            rejected=response.rejected,
            duplicates=response.duplicates,
            rejections=tuple(Rejection(r.index, r.event_id, r.field, r.reason) for r in response.rejections),
            event_ids=event_ids,
            response=response,
        )


@dataclass(frozen=True)
class CatalogueItem:
    """An item for `upsert_items`: its external id and the metadata new items are served by."""

    item_id: str
    title: str = ""
    author: str = ""
    categories: tuple[str, ...] = ()
    publisher: str = ""
    published_at: float | None = None  # unix seconds; None: unknown

    def to_proto(self) -> catalogue_pb2.CatalogueItem:
        message = catalogue_pb2.CatalogueItem(
            item_id=self.item_id,
            title=self.title,
            author=self.author,
            categories=list(self.categories),
            publisher=self.publisher,
        )
        if self.published_at is not None:
            message.published_at.FromNanoseconds(int(self.published_at * 1e9))
        return message


@dataclass(frozen=True)
class UpsertReport:
    added: int
    updated: int
    response: catalogue_pb2.UpsertItemsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: catalogue_pb2.UpsertItemsResponse) -> UpsertReport:
        return cls(response.added, response.updated, response)


@dataclass(frozen=True)
class WithdrawReport:
    withdrawn: int
    already_withdrawn: int
    unknown: int
    response: catalogue_pb2.WithdrawItemsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: catalogue_pb2.WithdrawItemsResponse) -> WithdrawReport:
        return cls(response.withdrawn, response.already_withdrawn, response.unknown, response)
