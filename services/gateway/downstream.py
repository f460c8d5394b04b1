"""The gateway's calls to recall and rank: one channel each, a deadline per call, and a
circuit breaker that stops calling a dependency that keeps failing and probes it back.

Failures are sorted here, once:
- the dependency is down or broken (UNAVAILABLE, INTERNAL, UNKNOWN, CANCELLED, or a deadline
  it missed although it had its full timeout and has answered nothing for `alive_seconds`) →
  `DownstreamError`, counted by the breaker; a dependency that keeps answering, only too late
  for some calls, is saturated: those timeouts degrade their answers but open nothing;
- the dependency is saturated and said so (RESOURCE_EXHAUSTED from its admission control) →
  `Overloaded`, which the gateway passes on to its caller as RESOURCE_EXHAUSTED: overload is
  not death, so the breaker does not count it, and a degraded answer would only hide it;
- a deadline missed because the call got less than the full timeout (the request arrived
  late) says nothing about the dependency → `DownstreamError`, not counted;
- the request itself was refused (INVALID_ARGUMENT, FAILED_PRECONDITION…) → `DownstreamError`
  with its code, the dependency counts as healthy."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc import aio

from recsys.errors import Overloaded
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
        self,
        name: str,
        breaker: CircuitBreaker,
        on_outcome: Callable[[], None] = lambda: None,
        *,
        alive_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self._on_outcome = on_outcome  # e.g. export the breaker's state as a metric
        # A timeout counts against the dependency only if it has not answered anything for
        # this long: one that keeps answering, just late, is saturated, not dead.
        self.alive_seconds = alive_seconds
        self._clock = clock
        self._answered_at = -float("inf")

    async def call(
        self, invoke: Callable[[float], Awaitable[ResponseT]], budget: float, full: float | None = None
    ) -> ResponseT:
        """`invoke(seconds)` performs the RPC with that gRPC deadline (grpc enforces it, so no
        asyncio timeout here); `full` is the timeout the dependency is normally given (a
        missed deadline counts against it only when `budget` was that much). Raises
        DownstreamError when there is no time left, the breaker is open or the call failed,
        and Overloaded when the dependency shed the call."""
        if budget <= 0.001:
            raise DownstreamError(self.name, "no time left")
        if not self.breaker.allow():
            self._on_outcome()
            raise DownstreamError(self.name, "circuit open")
        try:
            response = await invoke(budget)
        except aio.AioRpcError as error:
            code = error.code()
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._answered_at = self._clock()
                self.breaker.record_success()  # it answered, and at once: alive, only busy
                self._on_outcome()
                raise Overloaded(f"{self.name} is overloaded; retry later") from error
            timeout = code is grpc.StatusCode.DEADLINE_EXCEEDED
            squeezed = timeout and full is not None and budget < full * 0.99
            saturated = timeout and self._clock() - self._answered_at < self.alive_seconds
            if code not in UNHEALTHY:
                self._answered_at = self._clock()
                self.breaker.record_success()
            elif not (squeezed or saturated):
                self.breaker.record_failure()
            self._on_outcome()
            reason = "timeout" if code is grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower()
            raise DownstreamError(self.name, reason, code) from error
        self._answered_at = self._clock()
        self.breaker.record_success()
        self._on_outcome()
        return response
