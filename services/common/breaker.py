"""A circuit breaker per dependency: stop calling one that keeps failing, probe it back.

    closed ──(failure_threshold failures)──▶ open ──(open_seconds pass)──▶ half-open
      ▲                                       ▲                              │
      └──(half_open_probes probes succeed)────┼──────────────────────────────┤
                                              └──────(a probe fails)─────────┘

- closed: every call goes through; failures are counted, either consecutive ones (a
  success resets the count) or, with `window_seconds`, those within the last window;
- open: `allow()` is False at once, so the caller degrades without a network round trip;
- half-open: up to `half_open_probes` calls go through as probes; when that many have
  succeeded the breaker closes, the first failure re-opens it for another `open_seconds`.
  A probe whose outcome is never recorded (its caller was cancelled) is given up after
  `open_seconds`, so a lost probe cannot hold the breaker half-open forever.

Single-threaded by design (one asyncio event loop; no awaits inside, so no locks). The time
source is injected: tests drive it by hand. Results that arrive while the breaker is open
belong to calls admitted earlier and are ignored.

Usage:

    if not breaker.allow():
        return degraded("rank_unavailable")
    try:
        answer = await stub.Rank(request, timeout=budget)
    except grpc.aio.AioRpcError as error:
        if is_dependency_failure(error):
            breaker.record_failure()
        raise
    breaker.record_success()

Metrics stay outside: pass `on_transition` (called with the breaker and the old and new
state) and read `state`, `state.level` (0 closed, 1 half-open, 2 open) and `refusals`.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def level(self) -> int:
        """For a gauge: 0 closed, 1 half-open, 2 open."""
        return _LEVELS[self]


_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

TransitionListener = Callable[["CircuitBreaker", BreakerState, BreakerState], None]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        window_seconds: float | None = None,
        open_seconds: float = 5.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionListener | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be at least 1, got {failure_threshold}")
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError(
                f"window_seconds: must be positive or None (consecutive failures), got {window_seconds}"
            )
        if open_seconds <= 0:
            raise ValueError(f"open_seconds: must be positive, got {open_seconds}")
        if half_open_probes < 1:
            raise ValueError(f"half_open_probes: must be at least 1, got {half_open_probes}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.window_seconds = window_seconds
        self.open_seconds = open_seconds
        self.half_open_probes = half_open_probes
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()  # times of the failures that count
        self._opened_at = 0.0
        self._probes_admitted = 0
        self._probes_succeeded = 0
        self._last_probe_at = 0.0
        self.refusals = 0  # calls refused since creation

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose `open_seconds` have passed reads as
        half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_seconds:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def allow(self) -> bool:
        """Whether a call may go out now. In half-open a True admits a probe: the caller
        must then record its outcome."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            now = self._clock()
            if (
                self._probes_admitted >= self.half_open_probes
                and now - self._last_probe_at >= self.open_seconds
            ):
                # The probes in flight never reported: count them as lost and try again.
                self._probes_admitted = self._probes_succeeded
            if self._probes_admitted < self.half_open_probes:
                self._probes_admitted += 1
                self._last_probe_at = now
                return True
        self.refusals += 1
        return False

    def record_success(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            if self.window_seconds is None:
                self._failures.clear()
        elif state is BreakerState.HALF_OPEN:
            self._probes_succeeded += 1
            if self._probes_succeeded >= self.half_open_probes:
                self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.OPEN)
        elif state is BreakerState.CLOSED:
            now = self._clock()
            self._failures.append(now)
            if self.window_seconds is not None:
                while self._failures and now - self._failures[0] > self.window_seconds:
                    self._failures.popleft()
            if len(self._failures) >= self.failure_threshold:
                self._transition(BreakerState.OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._failures.clear()
        self._probes_admitted = 0
        self._probes_succeeded = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_transition is not None and old is not new:
            self._on_transition(self, old, new)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"
