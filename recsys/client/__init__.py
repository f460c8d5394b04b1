"""A Python client of the gateway's public gRPC API (`recsys.v1.Recommender`).

    from recsys.client import Event, Recommender, Tls

    async with Recommender("127.0.0.1:50051") as client:                 # asyncio
        answer = await client.recommend("196", count=10)
        for item in answer.items:
            print(item.position, item.item_id, item.title, item.score, item.channels)
        await client.report_events([Event("196", answer.items[0].item_id, "click",
                                          request_id=answer.request_id, scene=answer.scene)])

    with SyncRecommender("gateway:50051", tls=Tls(ca="ca.pem", cert="me.pem", key="me.key"),
                         token=api_key, timeout=0.5) as client:          # blocking twin
        answer = client.recommend("196")                                # the scene's default count

What it does for every caller: one channel (plaintext, TLS against a CA, or mTLS), the bearer
token (an API key or a JWT) on every call, a request id per call (sent as `x-request-id`, the
same on each attempt, so the server's log lines of every attempt share it), one deadline per
call across its attempts, and retries with jittered exponential backoff on
RESOURCE_EXHAUSTED and UNAVAILABLE only (`RetryPolicy`; `NO_RETRIES` for load tests). Results
are frozen dataclasses (`Recommendation`, `EventsReport`); a failure is a `RecommenderError`
with the status code, the details, the attempts and the request id.

Needs only grpcio and protobuf (the `serve` extra): no TensorFlow, nothing of the services.
"""

from __future__ import annotations

from recsys.client.channels import Tls, create_channel, create_sync_channel
from recsys.client.recommender import DEFAULT_TARGET, Recommender, RecommenderError, SyncRecommender
from recsys.client.results import (
    CatalogueItem,
    Event,
    EventKind,
    EventsReport,
    Recommendation,
    RecommendedItem,
    Rejection,
    StageTrace,
    UpsertReport,
    WithdrawReport,
)
from recsys.client.retry import NO_RETRIES, RETRYABLE, RetryPolicy

__all__ = [
    "DEFAULT_TARGET",
    "NO_RETRIES",
    "RETRYABLE",
    "CatalogueItem",
    "Event",
    "EventKind",
    "EventsReport",
    "Recommendation",
    "RecommendedItem",
    "Recommender",
    "RecommenderError",
    "Rejection",
    "RetryPolicy",
    "StageTrace",
    "SyncRecommender",
    "Tls",
    "UpsertReport",
    "WithdrawReport",
    "create_channel",
    "create_sync_channel",
]
