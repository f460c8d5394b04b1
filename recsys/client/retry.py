"""When a failed call is tried again, and after how long.

Only codes that say the call did not run, or may succeed unchanged a moment later, are
retried: RESOURCE_EXHAUSTED (the server shed it at once, or the caller is past its rate) and
UNAVAILABLE (shutting down, or nothing answered). INVALID_ARGUMENT, PERMISSION_DENIED and the
rest would fail the same way again. The waits grow exponentially with full jitter (a uniform
draw below the cap, so that callers shed together do not come back together), the attempts
are bounded, and every attempt runs within what is left of the call's one deadline: a wait
that would not leave time for another attempt is not taken, the last error is raised instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
# An attempt with less time than this left would only come back DEADLINE_EXCEEDED.
MIN_ATTEMPT_SECONDS = 0.005


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # the first call included; 1 = no retries
    initial_backoff: float = 0.05  # seconds: the cap of the first wait
    max_backoff: float = 1.0  # seconds: no wait's cap grows beyond this
    multiplier: float = 2.0
    retryable: frozenset[grpc.StatusCode] = field(default=RETRYABLE)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"initial_backoff, max_backoff: need 0 <= initial <= max, got "
                f"{self.initial_backoff}, {self.max_backoff}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be at least 1, got {self.multiplier}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt `attempt` (1-based): uniform in [0, cap)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, cap)

    def next_wait(self, code: grpc.StatusCode | None, attempt: int, remaining: float | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the error stands: not
        retryable, attempts used up, or the deadline (`remaining` seconds left) too close."""
        if code not in self.retryable or attempt >= self.max_attempts:
            return None
        wait = self.backoff(attempt)
        if remaining is not None and remaining - wait < MIN_ATTEMPT_SECONDS:
            return None
        return wait


NO_RETRIES = RetryPolicy(max_attempts=1)
