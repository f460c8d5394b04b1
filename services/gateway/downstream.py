"""The gateway's calls to recall and rank: one channel each, a deadline per call, and a
circuit breaker that stops calling a dependency that keeps failing and probes it back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc import aio

from services.common.breaker import CircuitBreaker

ResponseT = TypeVar("ResponseT")

# Codes that say the dependency is unwell (count towards opening its breaker). A refusal of
# the request itself (INVALID_ARGUMENT, FAILED_PRECONDITION…) says nothing about its health.
UNHEALTHY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


class DownstreamError(Exception):
    """A downstream call did not give a usable answer; `reason` names it for degraded_reasons."""

    def __init__(self, dependency: str, reason: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{dependency}: {reason}")
        self.dependency = dependency
        self.reason = reason
        self.code = code


class Downstream:
    """One dependency: calls it under a deadline and through its circuit breaker."""

    def __init__(
        self, name: str, breaker: CircuitBreaker, on_outcome: Callable[[], None] = lambda: None
    ) -> None:
        self.name = name
        self.breaker = breaker
        self._on_outcome = on_outcome  # e.g. export the breaker's state as a metric

    async def call(self, invoke: Callable[[float], Awaitable[ResponseT]], budget: float) -> ResponseT:
        """`invoke(seconds)` performs the RPC with that gRPC deadline (grpc enforces it, so no
        asyncio timeout here). Raises DownstreamError when there is no time left, the breaker
        is open or the call failed."""
        if budget <= 0.001:
            raise DownstreamError(self.name, "no time left")
        if not self.breaker.allow():
            self._on_outcome()
            raise DownstreamError(self.name, "circuit open")
        try:
            response = await invoke(budget)
        except aio.AioRpcError as error:
            code = error.code()
            if code in UNHEALTHY:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            self._on_outcome()
            reason = "timeout" if code is grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower()
            raise DownstreamError(self.name, reason, code) from error
        self.breaker.record_success()
        self._on_outcome()
        return response
