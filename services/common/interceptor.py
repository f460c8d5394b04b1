"""One server interceptor around every handler: request id, load shedding, error mapping,
metrics and draining. Servicers stay thin: they translate protobuf and raise domain errors.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, cast

import grpc
from grpc import aio

from recsys.errors import RecsysError
from services.common import metrics
from services.common.errors import code_label, status_for
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


def _code_of(context: aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode:
    # The stubs promise a StatusCode, but grpc.aio returns None until a code is set.
    code = cast("grpc.StatusCode | None", context.code())
    return default if code is None else code


class _Call:
    """Book-keeping for one call: its labels, its status code, its timing."""

    __slots__ = ("code", "labels", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()


class CallGuard(aio.ServerInterceptor):
    def __init__(self, service: str, max_in_flight: int, admitted: Collection[str] = ALWAYS_ADMITTED) -> None:
        self._service = service
        self._max_in_flight = max_in_flight
        self._admitted = frozenset(admitted)
        self.in_flight = 0
        self.draining = False
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(service)
        self._shed = metrics.SHED_TOTAL.labels(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        full_method = handler_call_details.method  # "/package.Service/Method"
        service_name, _, method_name = full_method.lstrip("/").partition("/")
        guarded = service_name not in self._admitted
        request_id = _request_id(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, ("unary", service_name, method_name), request_id, guarded),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(
                    handler.stream_unary, ("client_stream", service_name, method_name), request_id, guarded
                ),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(
                    handler.unary_stream, ("server_stream", service_name, method_name), request_id, guarded
                ),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(
                handler.stream_stream, ("bidi_stream", service_name, method_name), request_id, guarded
            ),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- the wrappers --------------------------------------------------------------------
    def _unary(
        self, behaviour: Any, labels: tuple[str, str, str], request_id: str, guarded: bool
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            call = await self._begin(labels, request_id, guarded, context)
            try:
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
        self, behaviour: Any, labels: tuple[str, str, str], request_id: str, guarded: bool
    ) -> Callable[[Any, aio.ServicerContext[Any, Any]], Any]:
        if not inspect.isasyncgenfunction(behaviour):
            # A streaming handler may also be a coroutine that writes with context.write()
            # (grpc's own health Watch does): it wraps like a unary one.
            return self._unary(behaviour, labels, request_id, guarded)

        async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = await self._begin(labels, request_id, guarded, context)
            try:
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
        request_id: str,
        guarded: bool,
        context: aio.ServicerContext[Any, Any],
    ) -> _Call:
        # Each call runs in its own task, so the context variable is per call.
        request_id_var.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        metrics.GRPC_STARTED.labels(*labels).inc()
        call = _Call(labels)
        if guarded:
            refusal = self._refusal()
            if refusal is not None:
                call.code, message = refusal
                self._record(call)
                await context.abort(call.code, message)
            self.in_flight += 1
            self._in_flight_gauge.inc()
        return call

    def _refusal(self) -> tuple[grpc.StatusCode, str] | None:
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"
        if self.in_flight >= self._max_in_flight:
            self._shed.inc()
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded: {self.in_flight} calls in flight"
                f" (cap {self._max_in_flight}); retry later",
            )
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
                log.info("%s.%s refused: %s", call.labels[1], call.labels[2], error)
                await context.abort(call.code, str(error))
        if isinstance(error, Exception):
            call.code = grpc.StatusCode.INTERNAL
            log.error("%s.%s failed", call.labels[1], call.labels[2], exc_info=error)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})"
            )
        call.code = grpc.StatusCode.UNKNOWN  # KeyboardInterrupt and the like: let them fly

    def _end(self, call: _Call, guarded: bool) -> None:
        if guarded:
            self.in_flight -= 1
            self._in_flight_gauge.dec()
        self._record(call)

    @staticmethod
    def _record(call: _Call) -> None:
        metrics.GRPC_HANDLED.labels(*call.labels, code_label(call.code)).inc()
        metrics.GRPC_HANDLING_SECONDS.labels(*call.labels).observe(time.perf_counter() - call.started)
