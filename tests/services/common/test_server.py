"""The service kit on a real grpc.aio server (port 0), in this process."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from recsys.v1 import recall_pb2, recall_pb2_grpc
from services.common import metrics
from tests.conftest import HostFactory, wait_serving
from tests.support.scripted_service import SECRET

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def recall(channel: aio.Channel, user_id: str, **kwargs: object) -> recall_pb2.RecallResponse:
    stub = recall_pb2_grpc.RecallStub(channel)
    return await stub.Recall(recall_pb2.RecallRequest(user_id=user_id), **kwargs)  # type: ignore[arg-type]


async def health_status(channel: aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(response.status)


async def test_health_is_not_serving_until_the_application_is_ready(start_host: HostFactory) -> None:
    running = await start_host(ready=False)
    for name in ("", "recsys.v1.Recall"):
        assert await health_status(running.channel, name) == NOT_SERVING
    running.ready.set()
    await wait_serving(running)
    for name in ("", "recsys.v1.Recall"):
        assert await health_status(running.channel, name) == SERVING
    with pytest.raises(aio.AioRpcError) as unknown:
        await health_status(running.channel, "recsys.v1.Nope")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_health_goes_not_serving_when_shutdown_starts(start_host: HostFactory) -> None:
    running = await start_host()
    watcher = health_pb2_grpc.HealthStub(running.channel).Watch(
        health_pb2.HealthCheckRequest(service="recsys.v1.Recall")
    )
    first = await watcher.read()
    assert first.status == SERVING
    stop = asyncio.create_task(running.host.stop(grace=1))
    second = await asyncio.wait_for(watcher.read(), timeout=5)
    assert second.status == NOT_SERVING
    await stop
    assert running.app.stopped


async def test_reflection_lists_the_services(start_host: HostFactory) -> None:
    running = await start_host()
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def ask() -> object:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(ask()):
        names |= {service.name for service in response.list_services_response.service}
    assert {"recsys.v1.Recall", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize(
    ("user_id", "code", "message"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "quotas[geo]: must be >= 0, got -1"),
        ("version", grpc.StatusCode.FAILED_PRECONDITION, "model_version: '' is not loaded here (have: v2)"),
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "redis unavailable: connection refused"),
    ],
)
async def test_domain_errors_map_to_status_codes(
    start_host: HostFactory, user_id: str, code: grpc.StatusCode, message: str
) -> None:
    running = await start_host()
    with pytest.raises(aio.AioRpcError) as raised:
        await recall(running.channel, user_id)
    assert raised.value.code() is code
    assert raised.value.details() == message


async def test_unexpected_error_is_internal_without_details_and_logged(
    start_host: HostFactory, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_host()
    metadata = aio.Metadata(("x-request-id", "req-crash-1"))
    with caplog.at_level(logging.ERROR, logger="recsys.server"), pytest.raises(aio.AioRpcError) as raised:
        await recall(running.channel, "crash", metadata=metadata)
    assert raised.value.code() is grpc.StatusCode.INTERNAL
    details = raised.value.details() or ""
    assert details == "internal error (request id req-crash-1)"
    assert SECRET not in details
    assert "Traceback" not in details
    assert SECRET not in str(raised.value.trailing_metadata())
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1
    assert getattr(logged[0], "request_id", None) == "req-crash-1"
    assert SECRET in str(logged[0].exc_info[1])  # type: ignore[index]


async def test_request_id_is_echoed_or_made(start_host: HostFactory) -> None:
    running = await start_host()
    stub = recall_pb2_grpc.RecallStub(running.channel)
    call = stub.Recall(
        recall_pb2.RecallRequest(user_id="u"), metadata=aio.Metadata(("x-request-id", "given-42"))
    )
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "given-42"
    call = stub.Recall(recall_pb2.RecallRequest(user_id="u"))
    await call
    made = dict(await call.trailing_metadata())["x-request-id"]
    assert isinstance(made, str)
    assert len(made) == 16


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_metrics_count_calls_by_method_and_code(start_host: HostFactory) -> None:
    running = await start_host()
    server = metrics.start_metrics_server("127.0.0.1", 0)
    try:
        labels = {"grpc_type": "unary", "grpc_service": "recsys.v1.Recall", "grpc_method": "Recall"}
        ok_before = _sample("grpc_server_handled_total", {**labels, "grpc_code": "OK"})
        bad_before = _sample("grpc_server_handled_total", {**labels, "grpc_code": "InvalidArgument"})
        started_before = _sample("grpc_server_started_total", labels)
        timed_before = _sample("grpc_server_handling_seconds_count", labels)
        for _ in range(3):
            await recall(running.channel, "u")
        for _ in range(2):
            with pytest.raises(aio.AioRpcError):
                await recall(running.channel, "invalid")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(scrape)
        assert 'grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="Recall"' in text
        assert _sample("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == ok_before + 3
        assert (
            _sample("grpc_server_handled_total", {**labels, "grpc_code": "InvalidArgument"}) == bad_before + 2
        )
        assert _sample("grpc_server_started_total", labels) == started_before + 5
        assert _sample("grpc_server_handling_seconds_count", labels) == timed_before + 5
    finally:
        server.close()


async def test_over_limit_calls_whose_deadline_cannot_wait_are_refused_at_once(
    start_host: HostFactory,
) -> None:
    running = await start_host(max_in_flight=2, min_in_flight=2, initial_in_flight=2)
    slow = [asyncio.create_task(recall(running.channel, "sleep:1.0")) for _ in range(2)]
    while running.host.guard.in_flight < 2:
        await asyncio.sleep(0.005)
    shed_before = _sample("recsys_server_shed_total", {"service": "scripted"})
    reason_before = _sample("recsys_server_shed_reasons_total", {"service": "scripted", "reason": "deadline"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(aio.AioRpcError) as raised:
        # 40 ms cannot cover the expected wait for a slot plus the mean latency (50 ms)
        await recall(running.channel, "u", timeout=0.04)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit 2" in (raised.value.details() or "")
    assert loop.time() - started < 0.03  # refused, not queued until the deadline
    assert _sample("recsys_server_shed_total", {"service": "scripted"}) == shed_before + 1
    assert (
        _sample("recsys_server_shed_reasons_total", {"service": "scripted", "reason": "deadline"})
        == reason_before + 1
    )
    # Health checks are never shed: a busy pod is not a dead pod.
    assert await health_status(running.channel, "") == SERVING
    for response in await asyncio.gather(*slow):
        assert response.item_indexes == [3, 1, 2]
    assert running.host.guard.in_flight == 0
    assert (await recall(running.channel, "u")).item_indexes == [3, 1, 2]


async def test_without_a_queue_over_limit_calls_are_refused_at_once(start_host: HostFactory) -> None:
    running = await start_host(max_in_flight=2, min_in_flight=2, initial_in_flight=2, max_queue_ms=0)
    slow = [asyncio.create_task(recall(running.channel, "sleep:0.5")) for _ in range(2)]
    while running.host.guard.in_flight < 2:
        await asyncio.sleep(0.005)
    before = _sample("recsys_server_shed_reasons_total", {"service": "scripted", "reason": "queue_full"})
    with pytest.raises(aio.AioRpcError) as raised:
        await recall(running.channel, "u", timeout=5)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        _sample("recsys_server_shed_reasons_total", {"service": "scripted", "reason": "queue_full"})
        == before + 1
    )
    await asyncio.gather(*slow)


async def test_a_burst_waits_in_the_queue_and_is_served_in_order(start_host: HostFactory) -> None:
    running = await start_host(max_in_flight=2, min_in_flight=2, initial_in_flight=2)
    slow = [asyncio.create_task(recall(running.channel, "sleep:0.2")) for _ in range(2)]
    while running.host.guard.in_flight < 2:
        await asyncio.sleep(0.005)
    finished: list[int] = []

    async def queued(index: int) -> None:
        await recall(running.channel, "sleep:0.01", timeout=5)
        finished.append(index)

    waiting = []
    for index in range(4):
        waiting.append(asyncio.create_task(queued(index)))
        while running.host.guard.admission.queued < index + 1:
            await asyncio.sleep(0.002)
    assert running.host.guard.in_flight == 2  # the limit holds while they wait
    await asyncio.gather(*slow, *waiting)
    assert sorted(finished) == [0, 1, 2, 3]
    assert finished[:2] in ([0, 1], [1, 0])
    assert finished[2:] in ([2, 3], [3, 2])
    assert running.host.guard.admission.queued == 0
    assert running.host.guard.in_flight == 0


async def test_the_limit_falls_when_calls_slow_down_and_rises_when_they_recover(
    start_host: HostFactory,
) -> None:
    """The scripted service sleeping stands for a slowed dependency: its latency passes the
    target, the limit falls; fast again, the limit climbs back under load."""
    running = await start_host(max_in_flight=64, min_in_flight=2, initial_in_flight=16, latency_target_ms=20)
    admission = running.host.guard.admission

    codes: set[grpc.StatusCode] = set()

    async def load(user: str, calls: int, parallel: int) -> None:
        async def worker() -> None:
            for _ in range(calls // parallel):
                try:
                    await recall(running.channel, user, timeout=5)
                except aio.AioRpcError as error:
                    codes.add(error.code())

        await asyncio.gather(*(worker() for _ in range(parallel)))

    start = admission.limit
    await load("sleep:0.04", 120, 16)  # 40 ms per call: twice the target
    slowed = admission.limit
    assert slowed < start / 2
    await load("sleep:0.004", 1200, 40)  # within the target again, more callers than the limit
    recovered = admission.limit
    assert recovered > slowed * 2
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED}  # queued or shed, never failed


async def test_connections_are_recycled_without_failing_calls(start_host: HostFactory) -> None:
    """With a short max connection age the server sends GOAWAY every 0.2 s; calls in flight
    finish on the old connection and new ones go out on a new one, none fails."""
    running = await start_host(max_connection_age_seconds=0.2, grace_seconds=1.0)
    started = asyncio.get_running_loop().time()
    answered = 0
    while asyncio.get_running_loop().time() - started < 1.5:
        calls = [recall(running.channel, "sleep:0.05", timeout=5) for _ in range(5)]
        responses = await asyncio.gather(*calls)
        answered += sum(list(response.item_indexes) == [3, 1, 2] for response in responses)
    assert answered >= 25


async def test_the_versions_a_server_can_serve_are_health_names(start_host: HostFactory) -> None:
    running = await start_host()
    readiness = running.host.readiness
    await readiness.set_versions(["v1"])
    assert await health_status(running.channel, "recsys.v1.Recall@v1") == SERVING
    await readiness.set_versions(["v2", "v1"])  # v1 during its grace period
    assert await health_status(running.channel, "recsys.v1.Recall@v1") == SERVING
    assert await health_status(running.channel, "recsys.v1.Recall@v2") == SERVING
    await readiness.set_versions(["v2"])  # v1 retired
    assert await health_status(running.channel, "recsys.v1.Recall@v1") == NOT_SERVING
    with pytest.raises(aio.AioRpcError) as never:
        await health_status(running.channel, "recsys.v1.Recall@v3")
    assert never.value.code() is grpc.StatusCode.NOT_FOUND
