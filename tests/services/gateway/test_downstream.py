"""How the gateway tells a saturated dependency from a dead one, against a real gRPC server
(the scripted recall service) on loopback."""

from __future__ import annotations

import asyncio

import pytest

from recsys.errors import Overloaded
from recsys.v1 import recall_pb2, recall_pb2_grpc
from services.common.breaker import BreakerState, CircuitBreaker
from services.gateway.downstream import Downstream, DownstreamError
from tests.conftest import HostFactory


def _state(link: Downstream) -> BreakerState:
    return link.breaker.state  # a call, so that mypy does not narrow it between asserts


def _link() -> Downstream:
    return Downstream("recall", CircuitBreaker("recall", failure_threshold=3, open_seconds=5.0))


async def test_a_dependency_that_sheds_is_overloaded_not_dead(start_host: HostFactory) -> None:
    running = await start_host(max_in_flight=1, min_in_flight=1, initial_in_flight=1, max_queue_ms=0)
    stub = recall_pb2_grpc.RecallStub(running.channel)
    link = _link()
    holder = asyncio.ensure_future(stub.Recall(recall_pb2.RecallRequest(user_id="sleep:0.5"), timeout=5))
    while running.host.guard.in_flight < 1:
        await asyncio.sleep(0.005)
    for _ in range(10):  # far past the breaker's threshold
        with pytest.raises(Overloaded):
            await link.call(
                lambda timeout: stub.Recall(recall_pb2.RecallRequest(user_id="u"), timeout=timeout), 1.0
            )
    assert _state(link) == BreakerState.CLOSED
    await holder


async def test_a_timeout_counts_against_a_dependency_only_when_it_had_its_full_timeout(
    start_host: HostFactory,
) -> None:
    running = await start_host()
    stub = recall_pb2_grpc.RecallStub(running.channel)
    link = _link()

    def slow(timeout: float) -> object:
        return stub.Recall(recall_pb2.RecallRequest(user_id="sleep:0.2"), timeout=timeout)

    for _ in range(5):  # squeezed: the request arrived late and had 50 ms of a 120 ms timeout
        with pytest.raises(DownstreamError) as raised:
            await link.call(slow, 0.05, 0.12)  # type: ignore[arg-type]
        assert raised.value.reason == "timeout"
    assert _state(link) == BreakerState.CLOSED
    for _ in range(3):  # its full timeout, missed: slow or hung, it counts
        with pytest.raises(DownstreamError):
            await link.call(slow, 0.05, 0.05)  # type: ignore[arg-type]
    assert _state(link) == BreakerState.OPEN
    with pytest.raises(DownstreamError) as raised:
        await link.call(slow, 0.05, 0.05)  # type: ignore[arg-type]
    assert raised.value.reason == "circuit open"


async def test_a_dead_dependency_opens_the_breaker(start_host: HostFactory) -> None:
    running = await start_host()
    stub = recall_pb2_grpc.RecallStub(running.channel)
    link = _link()
    for _ in range(3):
        with pytest.raises(DownstreamError) as raised:
            await link.call(
                lambda timeout: stub.Recall(recall_pb2.RecallRequest(user_id="unavailable"), timeout=timeout),
                1.0,
            )
        assert raised.value.reason == "unavailable"
    assert _state(link) == BreakerState.OPEN


async def test_timeouts_of_a_dependency_that_keeps_answering_open_nothing(start_host: HostFactory) -> None:
    """Saturated, not dead: between its late answers it answers others in time."""
    running = await start_host()
    stub = recall_pb2_grpc.RecallStub(running.channel)
    link = _link()

    def call(user: str) -> object:
        return lambda timeout: stub.Recall(recall_pb2.RecallRequest(user_id=user), timeout=timeout)

    for _ in range(5):
        await link.call(call("u"), 1.0)  # type: ignore[arg-type]
        with pytest.raises(DownstreamError) as raised:
            await link.call(call("sleep:0.2"), 0.05, 0.05)  # type: ignore[arg-type]
        assert raised.value.reason == "timeout"
    assert _state(link) == BreakerState.CLOSED
