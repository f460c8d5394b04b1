"""`Recommender` (asyncio) and `SyncRecommender`: the gateway's public API, `recsys.v1.Recommender`.

Both take the same arguments and return the same results; they differ only in the channel
(grpc.aio or blocking) and in how they wait between attempts.
"""

# ruff: noqa: ASYNC109 (`timeout` is each call's gRPC deadline, sent to the server)
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc import aio

from recsys.client.channels import Tls, create_channel, create_sync_channel
from recsys.client.results import (
    CatalogueItem,
    Event,
    EventsReport,
    Recommendation,
    UpsertReport,
    WithdrawReport,
)
from recsys.client.retry import RetryPolicy
from recsys.v1 import catalogue_pb2, catalogue_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
REQUEST_ID_KEY = "x-request-id"

Response = TypeVar("Response")
Metadata = tuple[tuple[str, str], ...]


class RecommenderError(Exception):
    """A call that failed for good: its last status `code` and `details`, how many
    `attempts` were made and the `request_id` to quote (the server logs it)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, *, attempts: int, request_id: str, target: str
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.attempts = attempts
        self.request_id = request_id
        self.target = target

    @classmethod
    def from_rpc(
        cls, error: grpc.RpcError, *, attempts: int, request_id: str, target: str
    ) -> RecommenderError:
        call: Any = error  # what grpc raises is also a grpc.Call, which carries the status
        code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
        details = (call.details() if hasattr(call, "details") else None) or str(error)
        return cls(code, details, attempts=attempts, request_id=request_id, target=target)


def new_request_id() -> str:
    return f"py-{uuid.uuid4().hex}"


class _Client:
    """What both clients share: settings, request building, the retry decisions."""

    def __init__(
        self,
        target: str,
        *,
        tls: Tls | None,
        token: str | None,
        timeout: float | None,
        retry: RetryPolicy,
        metadata: Iterable[tuple[str, str]],
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds (or None), got {timeout}")
        self.target = target
        self.tls = tls
        self.timeout = timeout
        self.retry = retry
        # API keys and JWTs both travel as a bearer token (services/common/auth.py).
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._metadata: Metadata = (*auth, *((key.lower(), value) for key, value in metadata))

    def _budget(self, timeout: float | None) -> float | None:
        budget = self.timeout if timeout is None else timeout
        if budget is not None and not budget > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {budget}")
        return None if budget is None else time.monotonic() + budget

    def _metadata_with(self, request_id: str) -> Metadata:
        return (*self._metadata, (REQUEST_ID_KEY, request_id))

    @staticmethod
    def _recommend_request(
        user_id: str,
        count: int,
        scene: str,
        exclude_item_ids: Sequence[str],
        region: str,
        request_time: float | None,
        attributes: Mapping[str, str] | None,
        dry_run: bool,
        debug: bool,
        request_id: str,
    ) -> gateway_pb2.RecommendRequest:
        context = common_pb2.RequestContext(region=region, attributes=dict(attributes or {}))
        if request_time is not None:
            context.request_time.FromNanoseconds(int(request_time * 1e9))
        return gateway_pb2.RecommendRequest(
            user_id=user_id,
            scene=scene,
            count=count,
            exclude_item_ids=list(exclude_item_ids),
            context=context,
            debug=debug,
            dry_run=dry_run,
            request_id=request_id,
        )

    @staticmethod
    def _events_request(events: Sequence[Event]) -> tuple[gateway_pb2.ReportEventsRequest, tuple[str, ...]]:
        # Ids are made before the first attempt, so that a retried batch is applied once.
        ids = tuple(event.event_id or f"py-{uuid.uuid4().hex}" for event in events)
        request = gateway_pb2.ReportEventsRequest(
            events=[event.to_proto(event_id) for event, event_id in zip(events, ids, strict=True)]
        )
        return request, ids

    def _give_up(self, error: grpc.RpcError, attempt: int, deadline: float | None, request_id: str) -> float:
        """The wait before the next attempt, or raise the error for good."""
        call: Any = error  # also a grpc.Call (both the aio and the blocking errors)
        code = call.code() if hasattr(call, "code") else None
        remaining = None if deadline is None else deadline - time.monotonic()
        wait = self.retry.next_wait(code, attempt, remaining)
        if wait is None:
            raise RecommenderError.from_rpc(
                error, attempts=attempt, request_id=request_id, target=self.target
            ) from None
        return wait


class Recommender(_Client):
    """An asyncio client of the gateway.

        async with Recommender("gateway:50051", tls=Tls(ca="ca.pem"), token=key) as client:
            answer = await client.recommend("196", count=10)
            await client.report_events([Event("196", answer.items[0].item_id, "click",
                                              request_id=answer.request_id, scene=answer.scene)])

    `timeout` is each call's whole budget in seconds (attempts and waits included; a call may
    give its own); `retry` the policy (`NO_RETRIES` for load tests, so shed calls stay
    visible); `token` an API key or a JWT; `channel` one of the caller's own (not closed here).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: Tls | None = None,
        token: str | None = None,
        timeout: float | None = 1.0,
        retry: RetryPolicy | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        channel: aio.Channel | None = None,
    ) -> None:
        super().__init__(
            target, tls=tls, token=token, timeout=timeout, retry=retry or RetryPolicy(), metadata=metadata
        )
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else create_channel(target, tls, options)
        self._stub = gateway_pb2_grpc.RecommenderStub(self.channel)
        # The live catalogue's calls, on the gateway's port (they need the recsys:catalogue scope).
        self._catalogue = catalogue_pb2_grpc.CatalogueServiceStub(self.channel)

    async def recommend(
        self,
        user_id: str,
        *,
        count: int = 0,
        scene: str = "",
        exclude_item_ids: Sequence[str] = (),
        region: str = "",
        request_time: float | None = None,
        attributes: Mapping[str, str] | None = None,
        dry_run: bool = False,
        debug: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Recommendation:
        """`count` 0 → the scene's default. `request_time` in unix seconds (None: the server's
        clock). Raises RecommenderError when the call fails for good."""
        request_id = request_id or new_request_id()
        request = self._recommend_request(
            user_id,
            count,
            scene,
            exclude_item_ids,
            region,
            request_time,
            attributes,
            dry_run,
            debug,
            request_id,
        )
        response = await self._call(self._stub.Recommend, request, timeout, request_id)
        return Recommendation.from_proto(response)

    async def report_events(self, events: Sequence[Event], *, timeout: float | None = None) -> EventsReport:
        """Report a batch (1 … the gateway's maximum, 1,000 by default). A rejected event is in
        the report, not an error; a retried batch is applied once (event ids)."""
        request, ids = self._events_request(events)
        response = await self._call(self._stub.ReportEvents, request, timeout, new_request_id())
        return EventsReport.from_proto(response, ids)

    async def upsert_items(
        self, items: Sequence[CatalogueItem], *, timeout: float | None = None
    ) -> UpsertReport:
        """Add or update items of the live catalogue (1 … the gateway's maximum, 1,000 by
        default, per call); served within the services' catalogue poll. Idempotent."""
        request = catalogue_pb2.UpsertItemsRequest(items=[item.to_proto() for item in items])
        response = await self._call(self._catalogue.UpsertItems, request, timeout, new_request_id())
        return UpsertReport.from_proto(response)

    async def withdraw_items(
        self, item_ids: Sequence[str], *, timeout: float | None = None
    ) -> WithdrawReport:
        """Withdraw items (upserted or the model version's own) from every answer. Idempotent."""
        request = catalogue_pb2.WithdrawItemsRequest(item_ids=list(item_ids))
        response = await self._call(self._catalogue.WithdrawItems, request, timeout, new_request_id())
        return WithdrawReport.from_proto(response)

    async def _call(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout: float | None, request_id: str
    ) -> Response:
        deadline = self._budget(timeout)
        metadata = self._metadata_with(request_id)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return await method(request, timeout=remaining, metadata=metadata)
            except aio.AioRpcError as error:
                await asyncio.sleep(self._give_up(error, attempt, deadline, request_id))

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Recommender:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()


class SyncRecommender(_Client):
    """The blocking twin of `Recommender` (same arguments, same results), for scripts, threads
    and gevent (locust)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: Tls | None = None,
        token: str | None = None,
        timeout: float | None = 1.0,
        retry: RetryPolicy | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(
            target, tls=tls, token=token, timeout=timeout, retry=retry or RetryPolicy(), metadata=metadata
        )
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else create_sync_channel(target, tls, options)
        self._stub = gateway_pb2_grpc.RecommenderStub(self.channel)
        # The live catalogue's calls, on the gateway's port (they need the recsys:catalogue scope).
        self._catalogue = catalogue_pb2_grpc.CatalogueServiceStub(self.channel)

    def recommend(
        self,
        user_id: str,
        *,
        count: int = 0,
        scene: str = "",
        exclude_item_ids: Sequence[str] = (),
        region: str = "",
        request_time: float | None = None,
        attributes: Mapping[str, str] | None = None,
        dry_run: bool = False,
        debug: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Recommendation:
        """See Recommender.recommend."""
        request_id = request_id or new_request_id()
        request = self._recommend_request(
            user_id,
            count,
            scene,
            exclude_item_ids,
            region,
            request_time,
            attributes,
            dry_run,
            debug,
            request_id,
        )
        return Recommendation.from_proto(self._call(self._stub.Recommend, request, timeout, request_id))

    def report_events(self, events: Sequence[Event], *, timeout: float | None = None) -> EventsReport:
        """See Recommender.report_events."""
        request, ids = self._events_request(events)
        response = self._call(self._stub.ReportEvents, request, timeout, new_request_id())
        return EventsReport.from_proto(response, ids)

    def upsert_items(self, items: Sequence[CatalogueItem], *, timeout: float | None = None) -> UpsertReport:
        """See Recommender.upsert_items."""
        request = catalogue_pb2.UpsertItemsRequest(items=[item.to_proto() for item in items])
        response = self._call(self._catalogue.UpsertItems, request, timeout, new_request_id())
        return UpsertReport.from_proto(response)

    def withdraw_items(self, item_ids: Sequence[str], *, timeout: float | None = None) -> WithdrawReport:
        """See Recommender.withdraw_items."""
        request = catalogue_pb2.WithdrawItemsRequest(item_ids=list(item_ids))
        response = self._call(self._catalogue.WithdrawItems, request, timeout, new_request_id())
        return WithdrawReport.from_proto(response)

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None, request_id: str
    ) -> Response:
        deadline = self._budget(timeout)
        metadata = self._metadata_with(request_id)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as error:
                time.sleep(self._give_up(error, attempt, deadline, request_id))

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> SyncRecommender:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
