"""One server interceptor around every handler: request id, caller authentication and the
per-caller rate limit when the application brings them (`services.common.auth`), admission
control (an adaptive concurrency limit with a short deadline-aware queue, `services.common.admission`), error
mapping, metrics and draining. Servicers stay thin: they translate protobuf and raise domain errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, cast

import grpc
from grpc import aio

from recsys.errors import NotReady, Overloaded, RecsysError
from services.common import metrics
from services.common.admission import Admission, AdmissionPolicy, Refused
from services.common.auth import CallerAuth, caller_var, grpc_certificate_names
from services.common.errors import code_label, safe_message, status_for
from services.common.logs import new_request_id, request_id_var

log = logging.getLogger("recsys.server")

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128

# Services that are never shed nor drained: probes must keep answering under overload,
# otherwise Kubernetes would restart a pod that is merely busy.
ALWAYS_ADMITTED = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= _MAX_REQUEST_ID:
            return value if value.isprintable() else new_request_id()
    return new_request_id()


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


class _Undecodable:
    """What the tolerant deserializer hands the handler for bytes that are not the message.

    grpc.aio calls the deserializer outside any handler: an exception there becomes UNKNOWN
    with the exception's class name, an ERROR traceback per call, and no metrics. Decoding
    into this marker instead lets the handler wrapper answer INVALID_ARGUMENT like any other
    bad request, counted in grpc_server_handled_total."""

    __slots__ = ("error", "expected")

    def __init__(self, error: Exception, expected: str) -> None:
        self.error = error
        self.expected = expected


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    expected = _message_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return _Undecodable(error, expected)

    return decode


def _message_name(deserializer: Any) -> str:
    message_class = getattr(deserializer, "__self__", None)  # FooRequest.FromString
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the request message"))


class RateLimitedLog:
    """At most one line per `window_seconds` for a kind of event a client can cause at will
    (a flood of garbage must not become a flood of log lines); the line says how many were
    not logged since the last one."""

    def __init__(self, logger: logging.Logger, window_seconds: float = 60.0) -> None:
        self._logger = logger
        self._window = window_seconds
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return False
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._window
        self._logger.warning(message + " (%d more not logged in the last window)", *args, suppressed)
        return True


def _code_of(context: aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode:
    # The stubs promise a StatusCode, but grpc.aio returns None until a code is set.
    code = cast("grpc.StatusCode | None", context.code())
    return default if code is None else code


class _MethodMetrics:
    """A method's labelled metric children, looked up once: `labels()` takes a lock and
    builds a key on every call, a measurable share of a busy server's CPU."""

    __slots__ = ("handled", "seconds", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.started = metrics.GRPC_STARTED.labels(*labels)
        self.seconds = metrics.GRPC_HANDLING_SECONDS.labels(*labels)
        self.handled: dict[grpc.StatusCode, Any] = {}


_METHOD_METRICS: dict[tuple[str, str, str], _MethodMetrics] = {}


def _children(labels: tuple[str, str, str]) -> _MethodMetrics:
    children = _METHOD_METRICS.get(labels)
    if children is None:
        children = _METHOD_METRICS[labels] = _MethodMetrics(labels)
    return children


class _Call:
    """Book-keeping for one call: its labels, its status code, its timing."""

    __slots__ = ("admitted", "arrived", "code", "labels", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.code = grpc.StatusCode.OK
        self.arrived = self.started = time.perf_counter()
        self.admitted = False  # holds an admission slot, to give back at the end


class CallGuard(aio.ServerInterceptor):
    def __init__(
        self,
        service: str,
        policy: AdmissionPolicy | int,
        admitted: Collection[str] = ALWAYS_ADMITTED,
        auth: CallerAuth | None = None,
    ) -> None:
        self._service = service
        # Caller authentication and the per-caller rate limit (the public edge only); the
        # services in `admitted` (health, reflection) stay open to unauthenticated probes.
        self.auth = auth
        if isinstance(policy, int):  # a fixed cap: no queue, the limit never moves
            policy = AdmissionPolicy(
                initial_limit=policy, min_limit=policy, max_limit=policy, max_queue_seconds=0.0
            )
        self.admission = Admission(policy)
        self._admitted = frozenset(admitted)
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.draining = False
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(service)
        self._limit_gauge = metrics.CONCURRENCY_LIMIT.labels(service)
        self._queued_gauge = metrics.QUEUED.labels(service)
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(service)
        self._shed = metrics.SHED_TOTAL.labels(service)
        self._undecodable_log = RateLimitedLog(log)
        self._limit_gauge.set(self.admission.limit)

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    @contextlib.asynccontextmanager
    async def slot(self, remaining: float | None) -> AsyncIterator[None]:
        """The same admission for another edge (the gateway's HTTP port): raises `NotReady`
        while draining and `Overloaded` when the call is shed, else holds a slot."""
        refusal = await self._admit_within(remaining)
        if refusal is not None:
            code, message = refusal
            raise NotReady(message) if code is grpc.StatusCode.UNAVAILABLE else Overloaded(message)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._give_back(started)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # One wrapped handler per method, built on its first call: building handlers and
        # closures per call cost a quarter of a trivial call's server CPU (measured). The
        # request id is read per call inside the wrapper.
        method = handler_call_details.method  # "/package.Service/Method"
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
                return handler
            wrapped = self._handlers[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        service_name, _, method_name = method.lstrip("/").partition("/")
        guarded = service_name not in self._admitted
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, ("unary", service_name, method_name), guarded),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, ("client_stream", service_name, method_name), guarded),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, ("server_stream", service_name, method_name), guarded),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, ("bidi_stream", service_name, method_name), guarded),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- the wrappers --------------------------------------------------------------------
    def _unary(
        self, behaviour: Any, labels: tuple[str, str, str], guarded: bool
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            call = await self._begin(labels, guarded, context)
            try:
                await self._refuse_undecodable(request, labels, context)
                response = await behaviour(request, context)
                call.code = _code_of(context, grpc.StatusCode.OK)
                return response
            except BaseException as error:
                await self._fail(call, error, context)
                raise  # unreachable for mapped errors: _fail aborts
            finally:
                self._end(call, guarded)

        return handle

    def _streaming(
        self, behaviour: Any, labels: tuple[str, str, str], guarded: bool
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Any]:
        if not inspect.isasyncgenfunction(behaviour):
            # A streaming handler may also be a coroutine that writes with context.write()
            # (grpc's own health Watch does): it wraps like a unary one.
            return self._unary(behaviour, labels, guarded)

        async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = await self._begin(labels, guarded, context)
            try:
                await self._refuse_undecodable(request, labels, context)
                async for response in behaviour(request, context):
                    yield response
                call.code = _code_of(context, grpc.StatusCode.OK)
            except BaseException as error:
                await self._fail(call, error, context)
                raise
            finally:
                self._end(call, guarded)

        return handle

    async def _begin(
        self,
        labels: tuple[str, str, str],
        guarded: bool,
        context: aio.ServicerContext[Any, Any],
    ) -> _Call:
        request_id = _request_id(context.invocation_metadata())
        # Each call runs in its own task, so the context variable is per call.
        request_id_var.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        _children(labels).started.inc()
        call = _Call(labels)
        if guarded and self.auth is not None:
            # Before admission: an unknown or over-limit caller never takes a slot.
            try:
                caller = self.auth.admit(
                    _authorization(context.invocation_metadata()),
                    grpc_certificate_names(context.auth_context()),
                )
            except RecsysError as error:
                call.code = status_for(error)
                self._record(call)
                await context.abort(call.code, safe_message(str(error)))
            caller_var.set(caller)
        if guarded:
            refusal = await self._admit(context)
            if refusal is not None:
                call.code, message = refusal
                self._record(call)
                await context.abort(call.code, message)
            call.admitted = True
            call.started = time.perf_counter()  # the work's latency, without the queue wait
        return call

    async def _refuse_undecodable(
        self, request: Any, labels: tuple[str, str, str], context: aio.ServicerContext[Any, Any]
    ) -> None:
        if not isinstance(request, _Undecodable):
            return
        self._undecodable_log.warning(
            "%s.%s: undecodable request (%s: %s)",
            labels[1],
            labels[2],
            type(request.error).__name__,
            safe_message(str(request.error), 200),
        )
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request: the bytes are not a valid {request.expected}"
        )

    async def _admit(self, context: aio.ServicerContext[Any, Any]) -> tuple[grpc.StatusCode, str] | None:
        return await self._admit_within(context.time_remaining())

    async def _admit_within(self, remaining: float | None) -> tuple[grpc.StatusCode, str] | None:
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"
        queued_at = time.perf_counter()
        admission = self.admission
        self._queued_gauge.set(admission.queued + 1)
        try:
            await admission.acquire(remaining)
        except Refused as refused:
            self._shed.inc()
            metrics.SHED_REASONS.labels(self._service, refused.reason).inc()
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(refused)
        finally:
            self._queued_gauge.set(admission.queued)
        self._queue_wait.observe(time.perf_counter() - queued_at)
        self._in_flight_gauge.set(admission.in_flight)
        return None

    async def _fail(self, call: _Call, error: BaseException, context: aio.ServicerContext[Any, Any]) -> None:
        if isinstance(error, aio.AbortError):  # the handler aborted with its own status
            call.code = _code_of(context, grpc.StatusCode.UNKNOWN)
            return
        if isinstance(error, asyncio.CancelledError):  # the client went away or the deadline passed
            call.code = grpc.StatusCode.CANCELLED
            return
        if isinstance(error, RecsysError):
            call.code = status_for(error)
            if call.code is not grpc.StatusCode.INTERNAL:
                message = safe_message(str(error))
                log.info("%s.%s refused: %s", call.labels[1], call.labels[2], message)
                await context.abort(call.code, message)
        if isinstance(error, Exception):
            call.code = grpc.StatusCode.INTERNAL
            log.error("%s.%s failed", call.labels[1], call.labels[2], exc_info=error)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})"
            )
        call.code = grpc.StatusCode.UNKNOWN  # KeyboardInterrupt and the like: let them fly

    def _end(self, call: _Call, guarded: bool) -> None:
        if call.admitted:
            self._give_back(call.started)
        self._record(call)

    def _give_back(self, started: float) -> None:
        self.admission.release(time.perf_counter() - started)
        self._in_flight_gauge.set(self.admission.in_flight)
        self._limit_gauge.set(self.admission.limit)

    @staticmethod
    def _record(call: _Call) -> None:
        children = _children(call.labels)
        handled = children.handled.get(call.code)
        if handled is None:
            handled = children.handled[call.code] = metrics.GRPC_HANDLED.labels(
                *call.labels, code_label(call.code)
            )
        handled.inc()
        children.seconds.observe(time.perf_counter() - call.arrived)
