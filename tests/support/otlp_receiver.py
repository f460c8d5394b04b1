"""A small OTLP/gRPC trace receiver on loopback: what a collector would be to the services,
for tests and `loadtest/bench_e2e.py --tracing`. It keeps every span it is sent (with its
resource's service.name) and answers each export at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # the OTLP enum: 2 SERVER, 3 CLIENT, 1 INTERNAL
    attributes: dict[str, object]


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]  # type: ignore[attr-defined]
    return getattr(any_value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`receiver.start()` → `receiver.endpoint` (http://127.0.0.1:PORT) for
    OTEL_EXPORTER_OTLP_ENDPOINT; `receiver.spans` grows as exports arrive. A synchronous gRPC
    server on threads of its own, so that it serves whatever event loops its user runs (an
    async test's, or none: the benchmark calls asyncio.run per phase)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep  # False: count only (a benchmark's long run)
        self.spans: list[ReceivedSpan] = []
        self.received = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            service = next(
                (
                    str(_value(attribute.value))
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self.keep:
                    continue
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            int(span.kind),
                            {attribute.key: _value(attribute.value) for attribute in span.attributes},
                        )
                    )
        with self._lock:
            self.received += count
            self.spans.extend(spans)
