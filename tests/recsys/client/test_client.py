"""The client library against real gRPC servers on loopback: the real stack (recall, rank and
the gateway on the quick store) for round trips and refusals, and a gateway stand-in that sheds
the calls the test tells it to, for what the real one does not do on cue (retries, deadlines).
TLS, mTLS, tokens and a real RESOURCE_EXHAUSTED (the rate limit): tests/services/gateway/test_auth.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from recsys.client import (
    NO_RETRIES,
    Event,
    Recommendation,
    Recommender,
    RecommenderError,
    RetryPolicy,
    SyncRecommender,
)
from recsys.feature_store import InProcessFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


# -- the policy alone ------------------------------------------------------------------------
def test_backoff_is_jittered_below_a_cap_that_grows_to_its_maximum() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    rng = random.Random(7)
    for attempt, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        waits = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0.0 <= wait < cap for wait in waits)
        assert max(waits) > 0.8 * cap  # spread over the whole range: full jitter
        assert len(set(waits)) > 150


def test_only_shed_and_unavailable_calls_are_retried_within_the_attempts_and_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        assert policy.next_wait(code, 1, remaining=1.0) is not None
        assert policy.next_wait(code, 3, remaining=1.0) is None  # attempts used up
        assert policy.next_wait(code, 1, remaining=0.004) is None  # no time for another attempt
    for other in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INTERNAL,
        None,
    ):
        assert policy.next_wait(other, 1, remaining=1.0) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# -- a gateway stand-in that fails on cue ----------------------------------------------------
@dataclass
class Scripted(gateway_pb2_grpc.RecommenderServicer):
    """Fails the first calls with `failures` (a code, or a (code, seconds to wait first) pair),
    then answers; remembers every call's metadata and request."""

    failures: list[grpc.StatusCode | tuple[grpc.StatusCode, float]] = field(default_factory=list)
    answer_after: float = 0.0  # seconds before a successful answer
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[object] = field(default_factory=list)

    async def _script(self, request: object, context: aio.ServicerContext[object, object]) -> None:
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata() or ()})
        self.requests.append(request)
        if self.failures:
            failure = self.failures.pop(0)
            code, wait = failure if isinstance(failure, tuple) else (failure, 0.0)
            await asyncio.sleep(wait)
            await context.abort(code, f"scripted {code.name}")
        await asyncio.sleep(self.answer_after)

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: aio.ServicerContext[object, object]
    ) -> gateway_pb2.RecommendResponse:
        await self._script(request, context)
        item = gateway_pb2.RecommendedItem(item_id="50", title="Star Wars", score=0.9, position=1)
        item.channels.append("itemcf")
        item.task_scores["click"] = 0.5
        return gateway_pb2.RecommendResponse(items=[item], request_id=request.request_id, scene="default")

    async def ReportEvents(
        self, request: gateway_pb2.ReportEventsRequest, context: aio.ServicerContext[object, object]
    ) -> gateway_pb2.ReportEventsResponse:
        await self._script(request, context)
        return gateway_pb2.ReportEventsResponse(accepted=len(request.events))

    @property
    def calls(self) -> int:
        return len(self.requests)


@dataclass
class ScriptedServer:
    servicer: Scripted
    target: str


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    servicer = Scripted()
    server = aio.server()
    gateway_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield ScriptedServer(servicer, f"127.0.0.1:{port}")
    await server.stop(grace=0)


async def test_a_shed_call_is_retried_with_the_same_request_id_then_answers(scripted: ScriptedServer) -> None:
    scripted.servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE]
    async with Recommender(
        scripted.target, retry=FAST, token="key-1", metadata=[("X-App", "tests")]
    ) as client:
        answer = await client.recommend("196", count=1, dry_run=True)
    assert scripted.servicer.calls == 3
    assert isinstance(answer, Recommendation)
    assert answer.items[0].item_id == "50"
    assert answer.items[0].channels == ("itemcf",)
    assert answer.items[0].task_scores == {"click": 0.5}
    ids = {call["x-request-id"] for call in scripted.servicer.metadata}
    assert ids == {answer.request_id}  # one id across the attempts, the one the answer carries
    assert all(call["authorization"] == "Bearer key-1" for call in scripted.servicer.metadata)
    assert all(call["x-app"] == "tests" for call in scripted.servicer.metadata)


async def test_invalid_argument_is_not_retried(scripted: ScriptedServer) -> None:
    scripted.servicer.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    async with Recommender(scripted.target, retry=FAST) as client:
        with pytest.raises(RecommenderError) as raised:
            await client.recommend("196", count=1)
    assert scripted.servicer.calls == 1
    assert (raised.value.code, raised.value.attempts) == (grpc.StatusCode.INVALID_ARGUMENT, 1)
    assert str(raised.value) == "INVALID_ARGUMENT: scripted INVALID_ARGUMENT"


async def test_attempts_are_bounded_and_no_retries_means_one_call(scripted: ScriptedServer) -> None:
    scripted.servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10
    async with Recommender(scripted.target, retry=FAST) as client:
        with pytest.raises(RecommenderError) as raised:
            await client.recommend("196")
        assert (raised.value.code, raised.value.attempts) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 4)
        assert scripted.servicer.calls == 4
        with pytest.raises(RecommenderError) as again:  # a longer deadline: the same bound
            await client.recommend("196", timeout=5)
        assert again.value.attempts == 4
    async with Recommender(scripted.target, retry=NO_RETRIES) as client:
        with pytest.raises(RecommenderError) as once:
            await client.recommend("196")
    assert once.value.attempts == 1
    assert scripted.servicer.calls == 9


async def test_the_deadline_covers_every_attempt_and_wait(scripted: ScriptedServer) -> None:
    # Always shed: the retries stop when the next wait would leave no time, before the deadline.
    scripted.servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 1000
    patient = RetryPolicy(max_attempts=1000, initial_backoff=0.02, max_backoff=0.05)
    async with Recommender(scripted.target, retry=patient, timeout=0.4) as client:
        started = time.monotonic()
        with pytest.raises(RecommenderError) as raised:
            await client.recommend("196")
        elapsed = time.monotonic() - started
    assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.attempts > 3
    assert elapsed < 0.4 + 0.1
    # A slow refusal, then a slow answer: the retry gets only what is left of the deadline.
    scripted.servicer.failures = [(grpc.StatusCode.UNAVAILABLE, 0.2)]
    scripted.servicer.answer_after = 2.0
    async with Recommender(scripted.target, retry=patient) as client:
        started = time.monotonic()
        with pytest.raises(RecommenderError) as late:
            await client.recommend("196", timeout=0.5)
        elapsed = time.monotonic() - started
    assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert late.value.attempts == 2
    assert 0.5 <= elapsed < 0.5 + 0.2


async def test_a_retried_event_batch_carries_the_same_event_ids(scripted: ScriptedServer) -> None:
    scripted.servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    events = [Event("196", "50", "click"), Event("196", "51", "rating", value=4.0, event_id="mine-1")]
    async with Recommender(scripted.target, retry=FAST) as client:
        report = await client.report_events(events)
    first, second = scripted.servicer.requests
    assert isinstance(first, gateway_pb2.ReportEventsRequest)
    assert isinstance(second, gateway_pb2.ReportEventsRequest)
    assert [event.event_id for event in first.events] == [event.event_id for event in second.events]
    assert list(report.event_ids) == [event.event_id for event in first.events]
    assert report.event_ids[1] == "mine-1"
    assert report.event_ids[0]  # made by the client, before the first attempt
    assert first.events[1].type == gateway_pb2.EVENT_TYPE_RATING
    assert first.events[1].time.seconds > 0  # stamped once, when sent
    assert report.accepted == 2


async def test_the_sync_twin_retries_and_honours_the_deadline_too(scripted: ScriptedServer) -> None:
    scripted.servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]

    def call() -> Recommendation:
        with SyncRecommender(scripted.target, retry=FAST) as client:
            return client.recommend("196", count=1)

    answer = await asyncio.to_thread(call)  # the server runs on this loop
    assert answer.items[0].item_id == "50"
    assert scripted.servicer.calls == 2
    scripted.servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 1000

    def shed() -> tuple[RecommenderError, float]:
        patient = RetryPolicy(max_attempts=1000, initial_backoff=0.02, max_backoff=0.05)
        with SyncRecommender(scripted.target, retry=patient, timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(RecommenderError) as raised:
                client.recommend("196")
            return raised.value, time.monotonic() - started

    error, elapsed = await asyncio.to_thread(shed)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.attempts > 2
    assert elapsed < 0.3 + 0.1


# -- the real stack --------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def stack(quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    running = await start_stack(quick_store, tmp_path_factory.mktemp("client"), InProcessFeatureStore())
    yield running
    await stop_stack(running)


class CountingInterceptor(aio.UnaryUnaryClientInterceptor):
    """Counts the attempts a client makes on its channel (what reaches the wire)."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls += 1
        return await continuation(details, request)


async def test_a_round_trip_with_the_real_gateway(stack: Stack) -> None:
    target = f"127.0.0.1:{stack.gateway.port}"
    async with Recommender(target, timeout=10) as client:
        answer = await client.recommend("196", count=5, dry_run=True, debug=True, request_id="client-test-1")
        assert answer.request_id == "client-test-1"
        assert len(answer.items) == 5
        assert [item.position for item in answer.items] == [1, 2, 3, 4, 5]
        assert all(item.title and item.channels for item in answer.items)
        assert all(set(item.task_scores) == {"click", "like"} for item in answer.items)
        assert answer.scene == "default"
        assert answer.model_version == stack.store.current()
        assert not answer.degraded
        assert [stage.stage for stage in answer.trace] == ["recall", "blocklist", "rank", "rerank"]
        assert answer.response.items[0].item_id == answer.items[0].item_id
        assert len((await client.recommend("196", dry_run=True)).items) == 20  # the scene's default count
        clicked = answer.items[0]
        report = await client.report_events(
            [
                Event(
                    "196",
                    clicked.item_id,
                    "click",
                    request_id=answer.request_id,
                    scene=answer.scene,
                    position=1,
                ),
                Event("196", "no-such-item", "click"),
            ]
        )
        assert (report.accepted, report.rejected, report.duplicates) == (1, 1, 0)
        assert (report.rejections[0].index, report.rejections[0].field) == (1, "item_id")
        again = await client.report_events(
            [Event("196", clicked.item_id, "click", event_id=report.event_ids[0])]
        )
        assert (again.accepted, again.duplicates) == (0, 1)


async def test_the_real_gateways_invalid_argument_is_raised_after_one_attempt(stack: Stack) -> None:
    counter = CountingInterceptor()
    channel = aio.insecure_channel(f"127.0.0.1:{stack.gateway.port}", interceptors=[counter])
    try:
        client = Recommender(channel=channel, timeout=10, retry=RetryPolicy(max_attempts=5))
        with pytest.raises(RecommenderError) as raised:
            await client.recommend("196", count=-1)
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details.startswith("count:")
        assert raised.value.attempts == 1
        assert counter.calls == 1
        await client.recommend("196", count=1, dry_run=True)
        assert counter.calls == 2
        await client.close()  # not its channel: left open
        await client.recommend("196", count=1, dry_run=True)
    finally:
        await channel.close()


LIMITED_KEY = "client-test-key-196"


@pytest.fixture(scope="module")
async def limited(quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The real stack with authentication on and the gateway's per-caller rate limit at 1 call/s
    with a burst of 1: its RESOURCE_EXHAUSTED comes from the gateway itself, as a shed call's
    would."""
    tmp = tmp_path_factory.mktemp("client-limited")
    keys = tmp / "api-keys.json"
    keys.write_text(
        json.dumps({"keys": [{"sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest(), "subject": "196"}]})
    )
    running = await start_stack(
        quick_store,
        tmp,
        InProcessFeatureStore(),
        auth_required=True,
        auth_api_keys_file=keys,
        rate_limit_per_second=1.0,
        rate_limit_burst=1,
    )
    yield running
    await stop_stack(running)


async def test_the_real_gateways_resource_exhausted_is_retried_until_it_answers(limited: Stack) -> None:
    counter = CountingInterceptor()
    channel = aio.insecure_channel(f"127.0.0.1:{limited.gateway.port}", interceptors=[counter])
    policy = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.2)
    try:
        client = Recommender(channel=channel, token=LIMITED_KEY, timeout=5, retry=policy)
        await asyncio.sleep(1.1)  # the bucket full again (one token)
        first = await client.recommend("196", count=3, dry_run=True)
        assert counter.calls == 1
        # The next call finds the bucket empty: refused by the gateway, retried with backoff
        # until a token is back (within a second), then answered.
        started = time.monotonic()
        second = await client.recommend("196", count=3, dry_run=True)
        elapsed = time.monotonic() - started
        assert [item.item_id for item in second.items] == [item.item_id for item in first.items]
        assert counter.calls >= 3  # at least one refusal reached the wire and was retried
        assert elapsed < 3.0
    finally:
        await channel.close()


async def test_the_real_gateways_refusals_stop_at_the_deadline(limited: Stack) -> None:
    counter = CountingInterceptor()
    channel = aio.insecure_channel(f"127.0.0.1:{limited.gateway.port}", interceptors=[counter])
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.02, max_backoff=0.02)
    try:
        client = Recommender(channel=channel, token=LIMITED_KEY, timeout=0.2, retry=policy)
        await asyncio.sleep(1.1)
        await client.recommend("196", count=1, dry_run=True)  # spends the token
        started = time.monotonic()
        with pytest.raises(RecommenderError) as raised:
            await client.recommend("196", count=1, dry_run=True)  # the next token is a second away
        elapsed = time.monotonic() - started
        assert raised.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert raised.value.attempts > 1
        assert raised.value.attempts == counter.calls - 1
        assert elapsed < 0.2 + 0.15  # the 0.2 s deadline covered every attempt and wait
    finally:
        await channel.close()


def test_the_client_needs_no_tensorflow_nor_the_services(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nimport recsys.client\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'services', 'numpy'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
