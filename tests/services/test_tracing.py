"""OpenTelemetry tracing across the stack: one trace from the gateway's edge (gRPC or HTTP)
through recall and rank, with the stages inside each service; nothing installed when off.

In one process (as `recsys up` without Redis runs the services) the three hosts share one
in-memory exporter; with separate processes (`recsys up --redis --tracing`) the services
export over OTLP/gRPC to a receiver the test runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from recsys.feature_store import InProcessFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.server import GrpcHost
from services.gateway.app import GatewayApp
from services.gateway.settings import GatewaySettings
from services.rank.app import RankApp
from services.rank.settings import RankSettings
from services.recall.app import RecallApp
from services.recall.settings import RecallSettings
from tests.recsys.feature_store import REDIS_URL
from tests.support.hosts import wait_until_serving
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import ROOT
from tests.support.stack import UpProcess, start_up

# Quotas for three channels whatever the build tuned (it may switch some off), so that their
# spans must be there.
SCENES = {
    "scenes": {
        "home": {
            "quotas": {"itemcf": 150, "two_tower": 150, "popular": 50},
            "prerank_keep": 150,
            "rerank": {"method": "mmr", "theta": 0.7},
        }
    }
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
USER = "196"


@dataclass
class TracedStack:
    hosts: list[GrpcHost]
    gateway_app: GatewayApp
    exporter: InMemorySpanExporter
    channel: aio.Channel

    def trace(self, trace_id: str = TRACE_ID) -> list[ReadableSpan]:
        return [
            span
            for span in self.exporter.get_finished_spans()
            if span.context is not None and format(span.context.trace_id, "032x") == trace_id
        ]


async def start_traced_stack(
    store: ModelStore, tmp: Path, *, tracing: bool = True, exporter: InMemorySpanExporter | None = None
) -> TracedStack:
    exporter = exporter or InMemorySpanExporter()
    features = InProcessFeatureStore()
    generous: dict[str, Any] = {"min_in_flight": 64, "initial_in_flight": 64, "tracing": tracing}
    recall_settings = RecallSettings(
        store=str(store.path), port=0, metrics_port=None, channel_timeout_ms=2000, **generous
    )
    recall = GrpcHost(RecallApp(recall_settings, features=features), recall_settings, span_exporter=exporter)
    rank_settings = RankSettings(store=str(store.path), port=0, metrics_port=None, **generous)
    rank = GrpcHost(RankApp(rank_settings, features=features), rank_settings, span_exporter=exporter)
    await recall.start()
    await rank.start()
    scenes = tmp / "scenes.json"
    scenes.write_text(json.dumps(SCENES))
    settings = GatewaySettings(
        store=str(store.path),
        port=0,
        http_port=0,
        metrics_port=None,
        recall_addr=f"127.0.0.1:{recall.port}",
        rank_addr=f"127.0.0.1:{rank.port}",
        event_log=tmp / "events.csv",
        scenes_file=scenes,
        default_deadline_ms=10_000,
        recall_timeout_ms=4000,
        rank_timeout_ms=4000,
        **generous,
    )
    app = GatewayApp(settings, features=features)
    gateway = GrpcHost(app, settings, span_exporter=exporter)
    await gateway.start()
    await wait_until_serving(recall, rank, gateway)
    channel = aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return TracedStack([recall, rank, gateway], app, exporter, channel)


@pytest.fixture
async def traced(quick_store: ModelStore, tmp_path: Path) -> AsyncIterator[TracedStack]:
    stack = await start_traced_stack(quick_store, tmp_path)
    yield stack
    await stack.channel.close()
    for host in reversed(stack.hosts):
        await host.stop(grace=0)


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, (name, sorted(span.name for span in spans))
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [span for span in spans if span.parent is not None and span.parent.span_id == _id(parent)]


def is_descendant(spans: Sequence[ReadableSpan], span: ReadableSpan, ancestor: ReadableSpan) -> bool:
    by_id = {_id(candidate): candidate for candidate in spans}
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        if current.parent.span_id == _id(ancestor):
            return True
        current = by_id.get(current.parent.span_id)
    return False


def check_service_spans(spans: Sequence[ReadableSpan], edge: ReadableSpan) -> None:
    """Everything below the gateway's edge span (gRPC Recommend or HTTP): the hops and stages."""
    assert _service(edge) == "recsys-gateway"
    assert edge.kind is SpanKind.SERVER
    assert edge.attributes is not None
    assert edge.attributes["recsys.scene"] == "home"
    assert {_service(span) for span in spans} == {"recsys-gateway", "recsys-recall", "recsys-rank"}
    # The gateway's stages, children of its server span, in the scene's pipeline
    stages = {span.name: span for span in children(spans, edge)}
    assert {"gateway.recall", "gateway.rank", "gateway.rerank"} <= set(stages)
    for name in ("gateway.recall", "gateway.rank", "gateway.rerank"):
        attributes = stages[name].attributes or {}
        assert attributes["recsys.scene"] == "home", name
    assert (stages["gateway.rerank"].attributes or {})["recsys.candidates_out"] == 10

    # gateway.recall → CLIENT Recall → recall's SERVER span → its stages
    (recall_client,) = children(spans, stages["gateway.recall"])
    assert (recall_client.name, recall_client.kind) == ("recsys.v1.Recall/Recall", SpanKind.CLIENT)
    (recall_server,) = children(spans, recall_client)
    assert (recall_server.kind, _service(recall_server)) == (SpanKind.SERVER, "recsys-recall")
    assert (recall_server.attributes or {})["rpc.grpc.status_code"] == 0
    assert is_descendant(spans, recall_server, edge)
    recall_stages = children(spans, recall_server)
    channels = {span for span in recall_stages if span.name.startswith("recall.channel ")}
    channel_names = {(span.attributes or {})["recsys.channel"] for span in channels}
    assert {"itemcf", "two_tower", "popular"} <= channel_names, channel_names
    for span in channels:
        attributes = span.attributes or {}
        assert span.name == f"recall.channel {attributes['recsys.channel']!s}"
        assert attributes["recsys.channel.outcome"] == "ok"
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
        assert recall_server.start_time is not None
        assert recall_server.end_time is not None
        assert recall_server.start_time <= span.start_time
        assert span.end_time <= recall_server.end_time
    counts = [(span.attributes or {})["recsys.channel.candidates"] for span in channels]
    assert all(isinstance(count, int) for count in counts)
    assert any(count for count in counts)
    merge = one(recall_stages, "recall.merge")
    assert int((merge.attributes or {})["recsys.candidates_out"]) > 150  # type: ignore[arg-type]
    # Rank is next in the scene: recall made the pre-rank cut (the scene's prerank_keep).
    prerank = one(recall_stages, "recall.prerank")
    assert (prerank.attributes or {})["recsys.candidates_in"] == (merge.attributes or {})[
        "recsys.candidates_out"
    ]
    assert (prerank.attributes or {})["recsys.candidates_out"] == 150

    # gateway.rank → CLIENT Rank → rank's SERVER span → features, the batch (no pre-rank of
    # its own: recall's cut arrived)
    (rank_client,) = children(spans, stages["gateway.rank"])
    assert (rank_client.name, rank_client.kind) == ("recsys.v1.Rank/Rank", SpanKind.CLIENT)
    (rank_server,) = children(spans, rank_client)
    assert (rank_server.kind, _service(rank_server)) == (SpanKind.SERVER, "recsys-rank")
    assert is_descendant(spans, rank_server, edge)
    rank_stages = children(spans, rank_server)
    assert "rank.prerank" not in {span.name for span in rank_stages}
    batch = one(rank_stages, "rank.batch")
    batch_attributes = batch.attributes or {}
    assert batch_attributes["recsys.batch.calls"] == 1  # one call at a time here
    assert batch_attributes["recsys.batch.rows"] == 150  # what pre-rank kept
    assert (rank_server.attributes or {})["recsys.batch.rows"] == 150
    assert [link.context.span_id for link in batch.links] == [_id(rank_server)]
    assert {span.name for span in children(spans, batch)} == {"rank.feature_assembly", "onnxruntime.run"}


async def test_one_trace_spans_gateway_recall_and_rank_over_grpc(traced: TracedStack) -> None:
    stub = gateway_pb2_grpc.RecommenderStub(traced.channel)
    # A first answer records exposures, so the traced call's recall runs the exposure filter.
    await stub.Recommend(gateway_pb2.RecommendRequest(user_id=USER, scene="home", count=10), timeout=10)
    await traced.gateway_app.engine.drain()
    response = await stub.Recommend(
        gateway_pb2.RecommendRequest(user_id=USER, scene="home", count=10),
        timeout=10,
        metadata=(("traceparent", TRACEPARENT), ("x-request-id", "trace-me-1")),
    )
    assert len(response.items) == 10
    assert not response.degraded_reasons
    spans = traced.trace()
    edge = one(spans, "recsys.v1.Recommender/Recommend")
    # The request id (in every log line) is on each service's server span.
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert {_service(span) for span in servers} == {"recsys-gateway", "recsys-recall", "recsys-rank"}
    assert {(span.attributes or {}).get("recsys.request_id") for span in servers} == {"trace-me-1"}
    assert edge.parent is not None
    assert format(edge.parent.span_id, "016x") == CALLER_SPAN_ID
    assert edge.parent.is_remote
    check_service_spans(spans, edge)
    exposure = one(children(spans, _recall_server(spans)), "recall.exposure_filter")
    assert int((exposure.attributes or {})["recsys.removed"]) > 0  # type: ignore[arg-type]
    # Every span of the first call is in a trace of its own (no traceparent: a new root).
    first_traces = {span.context.trace_id for span in traced.exporter.get_finished_spans() if span.context}
    assert len(first_traces) == 2


def _recall_server(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    (server,) = [span for span in spans if _service(span) == "recsys-recall" and span.kind is SpanKind.SERVER]
    return server


async def test_the_http_edge_starts_the_trace_and_honours_traceparent(traced: TracedStack) -> None:
    port = traced.gateway_app.http.port
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/recommend?user_id={USER}&scene=home&count=10",
        headers={"traceparent": TRACEPARENT},
    )
    body = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(request, timeout=10).read()))
    assert len(body["items"]) == 10
    spans = traced.trace()
    edge = one(spans, "GET /v1/recommend")
    assert edge.parent is not None
    assert format(edge.parent.span_id, "016x") == CALLER_SPAN_ID
    attributes = edge.attributes or {}
    assert (attributes["http.request.method"], attributes["http.response.status_code"]) == ("GET", 200)
    check_service_spans(spans, edge)


async def test_tracing_off_installs_nothing(quick_store: ModelStore, tmp_path: Path) -> None:
    """Off (the default): no interceptor besides the CallGuard, no middleware, no tracing
    object in any engine, client or batcher, no span — and in a fresh process, building the
    whole stack loads nothing of the tracing SDK."""
    exporter = InMemorySpanExporter()
    stack = await start_traced_stack(quick_store, tmp_path, tracing=False, exporter=exporter)
    try:
        for host in stack.hosts:
            assert host.tracing is None
            assert host.interceptors == (host.guard,)
        app = stack.gateway_app
        assert app.engine.tracing is None
        assert app.engine.recall_client.tracing is None
        assert app.engine.rank_client.tracing is None
        assert len(app.http.app.middlewares) == 3  # measured, errors, authenticated
        recall_app, rank_app = (host.app for host in stack.hosts[:2])
        assert isinstance(recall_app, RecallApp)
        assert isinstance(rank_app, RankApp)
        assert recall_app.engine.tracing is None
        assert rank_app.engine.tracing is None
        assert rank_app.batcher.tracing is None
        stub = gateway_pb2_grpc.RecommenderStub(stack.channel)
        response = await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=USER, scene="home", count=10),
            timeout=10,
            metadata=(("traceparent", TRACEPARENT),),
        )
        assert len(response.items) == 10
        assert exporter.get_finished_spans() == ()
    finally:
        await stack.channel.close()
        for host in reversed(stack.hosts):
            await host.stop(grace=0)

    code = f"""
import sys
from recsys.feature_store import InProcessFeatureStore
from services.common.server import GrpcHost
from services.gateway.app import GatewayApp
from services.gateway.settings import GatewaySettings
from services.rank.app import RankApp
from services.rank.settings import RankSettings
from services.recall.app import RecallApp
from services.recall.settings import RecallSettings
store = {str(quick_store.path)!r}
features = InProcessFeatureStore()
services = ((RecallApp, RecallSettings), (RankApp, RankSettings), (GatewayApp, GatewaySettings))
for app_type, settings_type in services:
    settings = settings_type(store=store, port=0, metrics_port=None)
    host = GrpcHost(app_type(settings, features=features), settings)
    assert host.tracing is None
# redis-py imports the metrics SDK when it is installed (its own opt-in observability, which
# does nothing unless initialised); nothing may load the tracing SDK or set a tracer provider.
from opentelemetry import trace
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry.sdk.trace"))
assert not loaded, loaded
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
print("no tracing")
"""
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "no tracing" in result.stdout


def test_sdk_disabled_wins_over_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.tracing import tracing_for

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing_for("gateway", True, InMemorySpanExporter()) is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    tracing = tracing_for("gateway", True, InMemorySpanExporter())
    assert tracing is not None
    tracing.shutdown()


def test_service_name_comes_from_otel_service_name_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.tracing import tracing_for

    exporter = InMemorySpanExporter()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "recall-eu")
    tracing = tracing_for("recall", True, exporter)
    assert tracing is not None
    with tracing.span("probe"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "recall-eu"
    tracing.shutdown()


# -- separate processes, exporting to a receiver the test runs ------------------------------
def _received_trace(receiver: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    return [span for span in list(receiver.spans) if span.trace_id == trace_id]


@pytest.mark.slow
async def test_separate_processes_export_one_trace_over_otlp(
    quick_store: ModelStore, stacks: list[UpProcess], prefix: str
) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
        up = start_up(quick_store.path, REDIS_URL, prefix, "--tracing", env=env)
        stacks.append(up)
        await asyncio.to_thread(up.wait_serving)
        async with aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as channel:
            response = await gateway_pb2_grpc.RecommenderStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=USER, count=10, dry_run=True),
                timeout=10,
                metadata=(("traceparent", TRACEPARENT),),
            )
        assert len(response.items) == 10
        wanted = {"recsys-gateway", "recsys-recall", "recsys-rank"}
        deadline = time.monotonic() + 20
        while {span.service for span in _received_trace(receiver, TRACE_ID)} != wanted:
            assert time.monotonic() < deadline, sorted({span.service for span in receiver.spans})
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the batch processors' last exports of the trace
        spans = _received_trace(receiver, TRACE_ID)
        by_id = {span.span_id: span for span in spans}
        (edge,) = [span for span in spans if span.name == "recsys.v1.Recommender/Recommend"]
        assert (edge.service, edge.parent_span_id) == ("recsys-gateway", CALLER_SPAN_ID)

        def reaches_edge(span: ReceivedSpan) -> bool:
            while span.parent_span_id in by_id:
                span = by_id[span.parent_span_id]
                if span is edge:
                    return True
            return False

        servers = {span.service: span for span in spans if span.kind == 2 and span is not edge}
        assert set(servers) == {"recsys-recall", "recsys-rank"}
        assert all(reaches_edge(span) for span in servers.values())
        channels = [span for span in spans if span.name.startswith("recall.channel ")]
        assert channels
        assert all(by_id[span.parent_span_id] is servers["recsys-recall"] for span in channels)
        (batch,) = [span for span in spans if span.name == "rank.batch"]
        assert batch.service == "recsys-rank"
        assert batch.attributes["recsys.batch.calls"] == 1
        assert reaches_edge(batch)
    finally:
        receiver.stop()
