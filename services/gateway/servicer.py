"""Protobuf in, protobuf out (gRPC and, through `json_format`, HTTP/JSON): no business logic
here (see engine.py and events.py)."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio

from recsys.errors import InvalidArgument
from recsys.feature_store import CatalogueItem
from recsys.limits import ID_CHARS, check_request, first_problem, valid_request_id
from recsys.v1 import catalogue_pb2, catalogue_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.auth import CATALOGUE_SCOPE, authorize_scope, authorize_user
from services.common.logs import request_id_var
from services.gateway.catalogue import CatalogueEditor
from services.gateway.engine import GatewayEngine, RecommendQuery, RecommendResult
from services.gateway.events import EventIngestor, EventsOutcome, IncomingEvent

_EVENT_TYPES = {
    gateway_pb2.EVENT_TYPE_UNSPECIFIED: "",
    gateway_pb2.EVENT_TYPE_IMPRESSION: "impression",
    gateway_pb2.EVENT_TYPE_CLICK: "click",
    gateway_pb2.EVENT_TYPE_LIKE: "like",
    gateway_pb2.EVENT_TYPE_RATING: "rating",
    gateway_pb2.EVENT_TYPE_CONSUME: "consume",
}


# ReportEvents judges each event on its own (a bad one is a rejection, not a failed batch).
_EACH_EVENT = frozenset({"recsys.v1.ReportEventsRequest.events"})


def recommend_query(request: gateway_pb2.RecommendRequest, time_remaining: float | None) -> RecommendQuery:
    """The engine's query from the request, once every field is within its limit (the same
    checks for gRPC and HTTP: both edges decode into this message)."""
    check_request(request)
    if request.request_id and not valid_request_id(request.request_id):
        # It is echoed in headers and trailing metadata, where CR, LF or NUL would break the
        # answer after its side effects happened.
        raise InvalidArgument("request_id", f"must be 1 to {ID_CHARS} printable ASCII characters")
    # Recommending for another user is refused like writing their events: an answer that is
    # not a dry run records exposures (it changes what that user is shown next), and any
    # answer discloses what their history says about them.
    authorize_user(request.user_id, "user_id")
    when = request.context.request_time
    return RecommendQuery(
        user_id=request.user_id,
        scene=request.scene,
        count=request.count,
        exclude_item_ids=tuple(request.exclude_item_ids),
        region=request.context.region,
        request_time=when.seconds + when.nanos / 1e9 if request.context.HasField("request_time") else 0.0,
        debug=request.debug,
        dry_run=request.dry_run,
        request_id=request.request_id,
        time_remaining=time_remaining,
    )


def recommend_response(result: RecommendResult, request_id: str) -> gateway_pb2.RecommendResponse:
    return gateway_pb2.RecommendResponse(
        items=[
            gateway_pb2.RecommendedItem(
                item_id=item.item_id,
                title=item.title,
                score=item.score,
                position=item.position,
                channels=item.channels,
                task_scores=item.task_scores,
            )
            for item in result.items
        ],
        request_id=request_id,
        model_version=result.model_version,
        arm=result.arm,
        experiment=result.experiment,
        scene=result.scene,
        degraded_reasons=result.degraded,
        cold_start=result.cold_start,
        trace=[
            gateway_pb2.StageTrace(
                stage=stage.stage,
                candidates_in=stage.candidates_in,
                candidates_out=stage.candidates_out,
                milliseconds=stage.milliseconds,
                detail=stage.detail,
            )
            for stage in result.trace
        ],
    )


def incoming_events(events: Sequence[gateway_pb2.Event]) -> list[IncomingEvent]:
    return [
        IncomingEvent(
            event_id=event.event_id,
            user_id=event.user_id,
            item_id=event.item_id,
            type=_EVENT_TYPES.get(event.type, ""),
            value=event.value,
            time=event.time.seconds + event.time.nanos / 1e9 if event.HasField("time") else 0.0,
            request_id=event.request_id,
            scene=event.scene,
            position=event.position,
            arm=event.arm,
            problem=first_problem(event),
        )
        for event in events
    ]


def events_response(outcome: EventsOutcome) -> gateway_pb2.ReportEventsResponse:
    return gateway_pb2.ReportEventsResponse(
        accepted=outcome.accepted,
        rejected=len(outcome.rejections),
        duplicates=outcome.duplicates,
        rejections=[
            gateway_pb2.EventRejection(
                index=rejection.index,
                event_id=rejection.event_id,
                field=rejection.field,
                reason=rejection.reason,
            )
            for rejection in outcome.rejections
        ],
    )


class RecommenderServicer(gateway_pb2_grpc.RecommenderServicer):
    def __init__(self, engine: GatewayEngine, ingestor: EventIngestor, max_events: int) -> None:
        self._engine = engine
        self._ingestor = ingestor
        self._max_events = max_events

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: aio.ServicerContext[object, object]
    ) -> gateway_pb2.RecommendResponse:
        result = await self._engine.recommend(recommend_query(request, context.time_remaining()))
        return recommend_response(result, request.request_id or request_id_var.get())

    async def ReportEvents(
        self, request: gateway_pb2.ReportEventsRequest, context: aio.ServicerContext[object, object]
    ) -> gateway_pb2.ReportEventsResponse:
        return await report_events(self._ingestor, request, self._max_events, context.time_remaining())


async def report_events(
    ingestor: EventIngestor,
    request: gateway_pb2.ReportEventsRequest,
    max_events: int,
    time_remaining: float | None = None,
) -> gateway_pb2.ReportEventsResponse:
    """`time_remaining`: the caller's deadline (seconds from now; None over HTTP or without
    one), which bounds how long the feature-store writes are retried."""
    if not request.events:
        raise InvalidArgument("events", "must not be empty")
    check_request(request, skip=_EACH_EVENT)
    if len(request.events) > max_events:
        raise InvalidArgument("events", f"at most {max_events} per call, got {len(request.events)}")
    # The whole call is refused (not one event rejected): a caller writing for someone else is
    # misconfigured or hostile, and a partial accept would hide that.
    for index, event in enumerate(request.events):
        authorize_user(event.user_id, f"events[{index}].user_id")
    return events_response(await ingestor.ingest(incoming_events(request.events), time_remaining))


def catalogue_item(message: catalogue_pb2.CatalogueItem, path: str) -> CatalogueItem:
    """The engine's item from the message (its limits already checked by `check_request`)."""
    if not message.item_id.strip():
        raise InvalidArgument(f"{path}.item_id", "must not be empty")
    published = message.published_at
    return CatalogueItem(
        item_id=message.item_id,
        title=message.title,
        author=message.author,
        categories=tuple(message.categories),
        publisher=message.publisher,
        published_at=published.seconds + published.nanos / 1e9 if message.HasField("published_at") else None,
    )


class CatalogueServicer(catalogue_pb2_grpc.CatalogueServiceServicer):
    def __init__(self, editor: CatalogueEditor) -> None:
        self._editor = editor

    async def UpsertItems(
        self, request: catalogue_pb2.UpsertItemsRequest, context: aio.ServicerContext[object, object]
    ) -> catalogue_pb2.UpsertItemsResponse:
        # The scope first: a caller that may not write learns nothing about the input's rules.
        authorize_scope(CATALOGUE_SCOPE, "UpsertItems")
        check_request(request)
        items = [catalogue_item(item, f"items[{index}]") for index, item in enumerate(request.items)]
        outcome = await self._editor.upsert(items)
        return catalogue_pb2.UpsertItemsResponse(added=outcome.added, updated=outcome.updated)

    async def WithdrawItems(
        self, request: catalogue_pb2.WithdrawItemsRequest, context: aio.ServicerContext[object, object]
    ) -> catalogue_pb2.WithdrawItemsResponse:
        authorize_scope(CATALOGUE_SCOPE, "WithdrawItems")
        check_request(request)
        outcome = await self._editor.withdraw(list(request.item_ids))
        return catalogue_pb2.WithdrawItemsResponse(
            withdrawn=outcome.withdrawn,
            already_withdrawn=outcome.already_withdrawn,
            unknown=outcome.unknown,
        )
