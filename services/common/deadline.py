"""Deadline budgets for downstream calls: each hop gets what is left minus a margin, so an
answer (possibly degraded) can still be assembled before the caller gives up."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    """An absolute point in monotonic time."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_remaining(cls, remaining: float | None, default: float) -> Deadline:
        """From a gRPC `context.time_remaining()` (None when the caller set no deadline),
        capped by `default` so a call without a deadline cannot hold resources forever."""
        if remaining is None:
            return cls.after(default)
        return cls.after(min(remaining, default))

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def budget(self, margin: float, cap: float | None = None) -> float:
        """Seconds a downstream call may take: the remaining time minus `margin` (the time
        this hop needs after the call returns), at most `cap`, never negative."""
        seconds = max(0.0, self.remaining() - margin)
        return seconds if cap is None else min(seconds, cap)

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0
