"""OpenTelemetry tracing, off by default.

Switched on per service by its `tracing` setting (`RECSYS_<SERVICE>_TRACING=true`, `--tracing`,
`recsys up --tracing`), read once at start-up; the exporter is configured by the standard
variables (`OTEL_TRACES_EXPORTER` = otlp (default) | console | none, `OTEL_EXPORTER_OTLP_ENDPOINT`
and the other OTLP/gRPC exporter variables, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`). `OTEL_SDK_DISABLED=true` keeps it off
whatever the setting says.

Off, `tracing_for` returns None and this code imports nothing of OpenTelemetry: no interceptor
is installed, no middleware, no span is made; the request path pays one `is None` test per stage
(`span_or_nothing`), so the overhead cannot be measured. (redis-py imports the metrics SDK when
it is installed, for its own observability, which stays off unless initialised.)

On, each service gets a `TracerProvider` of its own (so that `recsys up` without Redis, three
services in one process, still reports three `service.name`s) and:
- a server interceptor (`TracingInterceptor`) starting a SERVER span per unary call, its parent
  taken from the call's W3C `traceparent` metadata (health and reflection are not traced: the
  client-side health watches would be hour-long spans);
- client spans made by the gateway's `RecallClient`/`RankClient` themselves, which put
  `traceparent` into the metadata they already set (no client interceptor: it would cost a task
  per call, see `services.gateway.clients`);
- an aiohttp middleware for the gateway's HTTP/JSON edge, honouring an incoming `traceparent`;
- stage spans inside each service, some recorded after the fact from timings the code keeps
  anyway (recall's channels run in worker threads, rank's micro-batch in the inference thread,
  where the call's context is not current): `record_span`.

Our own small interceptor rather than opentelemetry-instrumentation-grpc: that package wraps
and rebuilds the handler per call and pulls `wrapt` and the instrumentation framework; ours
caches the wrapped handler per method, like `CallGuard`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

from services.common.logs import request_id_var

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("recsys.tracing")

# Not traced: probes and reflection (see the module doc).
UNTRACED_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

# Server-side failures, as the availability SLO counts them: these mark a server span ERROR
# (a client error such as INVALID_ARGUMENT is the caller's, its span stays UNSET).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# What `span_or_nothing` and `client_metadata` give when tracing is off: one shared, stateless
# context manager (entering it returns None, or no metadata), so the off path allocates nothing.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_NO_METADATA: contextlib.nullcontext[tuple[tuple[str, str], ...]] = contextlib.nullcontext(())

# time.perf_counter() → Unix nanoseconds, for spans recorded after the fact from the perf_counter
# readings the stages already take (one anchor per process: the clocks drift by microseconds
# over the life of a span, not more).
_PERF_TO_UNIX_NS = time.time_ns() - time.perf_counter_ns()


def unix_ns(perf_seconds: float) -> int:
    """A time.perf_counter() reading as Unix nanoseconds (a span's start or end)."""
    return int(perf_seconds * 1e9) + _PERF_TO_UNIX_NS


def sdk_disabled() -> bool:
    # The one standard switch that must win over our setting: OTEL_SDK_DISABLED turns every
    # OpenTelemetry SDK off. (The SDK itself reads the other OTEL_* variables.)
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


class Tracing:
    """Tracing switched on for one service: its tracer, and the pieces that make its spans."""

    def __init__(self, service: str, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        # Looked up once: an import statement per span is a measurable share of its cost.
        self._link, self._kind, self._status, self._code = Link, SpanKind, Status, StatusCode
        self.service = service
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(f"recsys.{service}")
        self._trace = trace
        self._propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS, W3C by default

    # -- context -------------------------------------------------------------------------
    def extract(self, carrier: Mapping[str, str]) -> Context:
        return self._propagator.extract(carrier)

    def inject(self, carrier: dict[str, str]) -> None:
        self._propagator.inject(carrier)

    def current_span(self) -> Span:
        return self._trace.get_current_span()

    def context_of(self, span: Span) -> Context:
        return self._trace.set_span_in_context(span)

    # -- spans ---------------------------------------------------------------------------
    def span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Span]:
        """An INTERNAL span, current while the block runs (a stage on the event loop)."""
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def record_span(
        self,
        name: str,
        started: float,
        finished: float,
        attributes: Mapping[str, Any] | None = None,
        *,
        parent: Span | None = None,
        links: Sequence[Span] = (),
        error: str | None = None,
    ) -> Span:
        """A span that has already happened, from time.perf_counter() readings (work done in
        a thread, where the call's context is not current). Parent: `parent`, else the
        current span. Returns the ended span, to parent others."""
        span = self.tracer.start_span(
            name,
            context=None if parent is None else self._trace.set_span_in_context(parent),
            attributes=attributes,
            links=[self._link(other.get_span_context()) for other in links],
            start_time=unix_ns(started),
        )
        if error is not None:
            span.set_status(self._status(self._code.ERROR, error))
        span.end(end_time=unix_ns(finished))
        return span

    @contextlib.contextmanager
    def client_call(self, method: str) -> Iterator[tuple[tuple[str, str], ...]]:
        """A CLIENT span around one outgoing unary call to `method` ("/recsys.v1.Recall/Recall");
        yields the metadata that carries its context (traceparent) to the server."""
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        with self.tracer.start_as_current_span(
            f"{service}/{name}",
            kind=self._kind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            carrier: dict[str, str] = {}
            self.inject(carrier)
            try:
                yield tuple(carrier.items())
            except BaseException as error:
                code = getattr(error, "code", None)  # DownstreamError carries the gRPC code
                if isinstance(code, grpc.StatusCode):
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(self._status(self._code.ERROR, f"{type(error).__name__}: {error}"))
                raise
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])

    # -- edges ---------------------------------------------------------------------------
    def server_interceptor(self) -> TracingInterceptor:
        return TracingInterceptor(self)

    def http_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware starting a SERVER span per request (the outermost one)."""
        from aiohttp import web
        from opentelemetry.trace import SpanKind, Status, StatusCode

        @web.middleware
        async def traced(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            with self.tracer.start_as_current_span(
                f"{request.method} {route}",
                context=self.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": request.method,
                    "http.route": route,
                    "url.path": request.path,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                status = 500
                try:
                    response = await handler(request)
                    status = response.status
                    return response
                except web.HTTPException as error:
                    status = error.status
                    raise
                finally:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))

        return traced

    def shutdown(self) -> None:
        """Export what is buffered (the batch processor's queue) and stop."""
        self.provider.shutdown()


class TracingInterceptor(aio.ServerInterceptor):
    """A SERVER span around each unary call, child of the caller's span when the call carries a
    `traceparent`. The wrapped handler is built once per method."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        service, _, name = method.lstrip("/").partition("/")
        if handler is None or handler.unary_unary is None or service in UNTRACED_SERVICES:
            wrapped = handler  # unknown methods, streams, health and reflection: as they are
        else:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._traced(handler.unary_unary, service, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        self._handlers[method] = wrapped
        return wrapped

    def _traced(
        self, behaviour: Any, service: str, name: str
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracing = self._tracing
        span_name = f"{service}/{name}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            carrier = {
                key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
            }
            with tracing.tracer.start_as_current_span(
                span_name,
                context=tracing.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await behaviour(request, context)
                finally:
                    # grpc.aio gives None until a code is set (the stubs promise a StatusCode)
                    code = cast("grpc.StatusCode | None", context.code()) or grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    # The call guard (inside this span) set it: a log line leads to its trace.
                    request_id = request_id_var.get()
                    if request_id != "-":
                        span.set_attribute("recsys.request_id", request_id)
                    if code in _SERVER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return handle


def _exporter() -> SpanExporter | None:
    """The exporter OTEL_TRACES_EXPORTER names: otlp (OTLP over gRPC, the default), console or
    none (spans are made and sampled but go nowhere)."""
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if choice == "none":
        return None
    if choice == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if choice == "otlp":
        # Reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT (default localhost:4317), _INSECURE,
        # _HEADERS, _TIMEOUT, _COMPRESSION and the certificate variables itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: {choice!r} is not supported here (otlp, console or none)")


def tracing_for(service: str, enabled: bool, exporter: SpanExporter | None = None) -> Tracing | None:
    """The service's tracing, or None when it is off (`enabled` is its `tracing` setting).
    `exporter` (tests): export every span at once to it instead of batching to what the
    OTEL_* variables name."""
    if not enabled:
        return None
    if sdk_disabled():
        log.info("tracing is switched on but OTEL_SDK_DISABLED=true: no spans")
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"recsys-{service}"}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER[_ARG]
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        configured = _exporter()
        if configured is not None:
            # Batched in a background thread (OTEL_BSP_*): exporting never waits on a call.
            provider.add_span_processor(BatchSpanProcessor(configured))
    log.info("tracing on", extra={"service_name": resource.attributes.get(SERVICE_NAME)})
    return Tracing(service, provider)


def span_or_nothing(
    tracing: Tracing | None, name: str | None, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """`with span_or_nothing(self.tracing, "recall.merge") as span:` — a span when tracing is
    on, the shared no-op (span None) when it is off or `name` is None (a stage not traced)."""
    if tracing is None or name is None:
        return _NO_SPAN
    return tracing.span(name, attributes)


def client_metadata(
    tracing: Tracing | None, method: str
) -> contextlib.AbstractContextManager[tuple[tuple[str, str], ...]]:
    """`with client_metadata(self.tracing, METHOD) as carried:` — a CLIENT span and the metadata
    carrying it when tracing is on; no span and no metadata when it is off."""
    if tracing is None:
        return _NO_METADATA
    return tracing.client_call(method)
