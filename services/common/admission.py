"""Admission control: how many calls a process works on at once, sized to what it can finish
in time, with a short deadline-aware queue in front.

Why: with a fixed cap far above what a core can finish (it was 256), a burst admits every
call, they all progress slowly together, they all overrun their callers' deadlines and the CPU
spent on them is thrown away (goodput fell 6× past ~32 calls in flight). Here:

- **An adaptive limit (AIMD on latency,** in the style of Netflix's concurrency-limits
  `AIMDLimit`, windowed against noise). Completed calls are grouped in windows of
  `window_calls` calls (or `window_seconds`, whichever ends first). A window whose 90th
  percentile latency exceeds `latency_target` multiplies the limit by `backoff`; a window
  within target in which the limit was actually used (calls queued, or the peak in flight
  reached most of it) adds one. The limit stays within [`min_limit`, `max_limit`]. So it falls
  when the process (or a dependency it waits on) slows down and rises again when it recovers.
- **A short FIFO queue.** A call beyond the limit waits, in arrival order, but only when its
  expected wait (its queue position × the wait per place measured on the calls that got a
  slot) plus its expected service time (the larger of the mean and the recent p90)
  fits in both its remaining deadline and `max_queue_seconds`; otherwise it is refused at once.
  A queued call whose time runs out before a slot frees is refused then, and a queued call
  whose caller goes away leaves the queue. A burst therefore queues briefly and
  is served in order, and only what its deadlines cannot allow is shed.

Single event loop, no awaits between reading and updating the counters: no locks. The clock
is injected so tests can drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionPolicy:
    initial_limit: int = 16
    min_limit: int = 2
    max_limit: int = 256
    latency_target: float = 0.05  # seconds: a window's p90 above it lowers the limit
    backoff: float = 0.8
    window_calls: int = 20
    window_seconds: float = 1.0
    max_queue_seconds: float = 0.5  # the longest a call may expect to wait for a slot
    default_deadline: float = 1.0  # for a call without a deadline

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(
                f"min_limit/max_limit: need 1 <= min <= max, got {self.min_limit}, {self.max_limit}"
            )
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff: must be in (0, 1), got {self.backoff}")
        if self.latency_target <= 0:
            raise ValueError(f"latency_target: must be positive, got {self.latency_target}")
        if self.max_queue_seconds < 0:
            raise ValueError(f"max_queue_seconds: must be >= 0, got {self.max_queue_seconds}")
        if self.window_calls < 1:
            raise ValueError(f"window_calls: must be at least 1, got {self.window_calls}")


class Refused(Exception):
    """The call was not admitted; `reason` is a metric label (`queue_full`, `deadline`,
    `queue_timeout`) and the message says why to the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AdaptiveLimit:
    """The AIMD limit alone (see the module's docstring); fed one latency per completed call."""

    def __init__(self, policy: AdmissionPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.value = float(min(max(policy.initial_limit, policy.min_limit), policy.max_limit))
        self._samples: list[float] = []
        self._window_started = clock()
        self._peak = 0
        self._queued_during = False
        # The mean latency and the completion rate, for the queue's estimates; no data yet: the
        # target, and the rate the initial limit would give at the target.
        self.mean_latency = policy.latency_target
        self.throughput = self.value / policy.latency_target
        self._last_p90 = policy.latency_target

    @property
    def service_time(self) -> float:
        """What a call admitted now should be sure to have left: twice the larger of the mean
        and the last window's p90. A queued call is let go (refused) once less remains, since
        started later it would reach its dependencies with squeezed deadlines and end degraded
        or past its deadline, work thrown away."""
        return 2.0 * max(self.mean_latency, self._last_p90)

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def observe_load(self, in_flight: int, queued: int) -> None:
        self._peak = max(self._peak, in_flight)
        if queued:
            self._queued_during = True

    def sample(self, latency: float) -> None:
        self.mean_latency += 0.05 * (latency - self.mean_latency)
        self._samples.append(latency)
        now = self._clock()
        policy = self.policy
        if len(self._samples) < policy.window_calls and now - self._window_started < policy.window_seconds:
            return
        if self._queued_during and now > self._window_started:
            # Calls waited all window long, so the completion rate measured is the capacity.
            rate = len(self._samples) / (now - self._window_started)
            self.throughput += 0.5 * (rate - self.throughput)
        elif not self._queued_during:  # not saturated: Little's law at the current limit
            self.throughput = self.value / max(self.mean_latency, 1e-4)
        samples = sorted(self._samples)
        p90 = samples[min(len(samples) - 1, math.ceil(0.9 * len(samples)) - 1)]
        self._last_p90 = p90
        if p90 > policy.latency_target:
            self.value = max(float(policy.min_limit), self.value * policy.backoff)
        elif self._queued_during or self._peak >= 0.8 * self.value:
            self.value = min(float(policy.max_limit), self.value + 1.0)
        self._samples = []
        self._window_started = now
        self._peak = 0
        self._queued_during = False


class Admission:
    """The limit and its queue. `acquire()` before the work (raises `Refused`), `release()`
    after it with the work's duration."""

    def __init__(self, policy: AdmissionPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.limiter = AdaptiveLimit(policy, clock)
        self.in_flight = 0
        self._queue: deque[_Waiter] = deque()
        # Seconds of waiting per place ahead in the queue, measured on the calls that got a
        # slot (their wait ÷ their position when they joined): exactly what the estimate
        # predicts, so it calibrates itself to however fast slots actually free.
        self._per_place: float | None = None

    @property
    def limit(self) -> int:
        return self.limiter.limit

    @property
    def queued(self) -> int:
        return len(self._queue)

    def expected_wait(self, position: int) -> float:
        """Seconds until a call joining the queue at `position` (1 = next) gets a slot: the
        measured wait per place, or, before any call has waited, what Little's law gives."""
        per_place = self._per_place
        if per_place is None:
            per_place = 1.0 / max(self.limiter.throughput, 1.0)
        return position * per_place

    async def acquire(self, remaining: float | None) -> None:
        """Take a slot now, or wait for one in the queue when the call's deadline (`remaining`
        seconds, None: the policy's default) allows; raise `Refused` otherwise."""
        if self.in_flight < self.limit and not self._queue:
            self._admit()
            return
        service = self.limiter.service_time
        budget = min(
            self.policy.default_deadline if remaining is None else remaining,
            self.policy.max_queue_seconds + service,
        )
        position = len(self._queue) + 1
        wait = self.expected_wait(position)
        # A quarter of headroom on the estimate: a call admitted to the queue that then runs out
        # of time in it is refused late (after waiting), the costliest way to be refused.
        if 1.25 * wait + service > budget:
            short = remaining is not None and remaining < self.policy.max_queue_seconds
            reason = "deadline" if short else "queue_full"
            raise Refused(
                reason,
                f"server overloaded: {self.in_flight} calls in flight (limit {self.limit}),"
                f" {len(self._queue)} queued, expected wait {wait * 1000:.0f} ms; retry later",
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self._clock(), position)
        future = waiter.future
        self._queue.append(waiter)
        self.limiter.observe_load(self.in_flight, len(self._queue))
        try:
            # Given up while the call still has the time its work needs, so that a call let go
            # late is refused here rather than started and failed at its deadline downstream.
            async with asyncio.timeout(max(0.0, budget - service)):
                await future  # resolved by release(), which has counted this call in flight
        except TimeoutError:
            if _granted(future):
                return  # the slot came just as the time ran out: take it
            self._forget(waiter)
            # It waited all this time without a slot: the estimate was short by at least that.
            self._calibrate((self._clock() - waiter.since) / waiter.position)
            raise Refused(
                "queue_timeout",
                f"server overloaded: no slot within {budget * 1000:.0f} ms (limit {self.limit}); retry later",
            ) from None
        except BaseException:  # the caller went away while queued
            if _granted(future):
                self.in_flight -= 1  # hand the slot just given on
                self._hand_over()
            else:
                self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        waiter.future.cancel()
        with contextlib.suppress(ValueError):  # already taken off by release()
            self._queue.remove(waiter)

    def _calibrate(self, per_place: float) -> None:
        if self._per_place is None:
            self._per_place = per_place
        else:
            self._per_place += 0.2 * (per_place - self._per_place)

    def _admit(self) -> None:
        self.in_flight += 1
        self.limiter.observe_load(self.in_flight, len(self._queue))

    def release(self, seconds: float) -> None:
        """A call that had a slot ended after `seconds` of work."""
        self.in_flight -= 1
        self.limiter.sample(seconds)
        self._hand_over()

    def _hand_over(self) -> None:
        while self._queue and self.in_flight < self.limit:
            waiter = self._queue.popleft()
            if waiter.future.done():  # timed out or its caller went away
                continue
            self._admit()
            waiter.future.set_result(None)
            self._calibrate((self._clock() - waiter.since) / waiter.position)


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    since: float  # when it joined the queue
    position: int  # its place when it joined (1 = next)


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()
