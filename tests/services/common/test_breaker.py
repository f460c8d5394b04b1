"""Circuit breaker state transitions, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from services.common.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(clock: FakeClock, **options: object) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    made = CircuitBreaker(
        "rank",
        clock=clock,
        on_transition=lambda _, old, new: seen.append((old.value, new.value)),
        **options,  # type: ignore[arg-type]
    )
    return made, seen


def state(circuit: CircuitBreaker) -> BreakerState:
    """Read through a call: mypy would otherwise keep a narrowed `circuit.state` across calls
    that change it."""
    return circuit.state


def fail(circuit: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert circuit.allow()
        circuit.record_failure()


def test_opens_after_consecutive_failures_and_refuses_without_calling() -> None:
    clock = FakeClock()
    circuit, seen = breaker(clock, failure_threshold=3, open_seconds=10)
    fail(circuit, 2)
    assert state(circuit) is BreakerState.CLOSED
    circuit.record_failure()
    assert state(circuit) is BreakerState.OPEN
    assert seen == [("closed", "open")]
    assert not circuit.allow()
    assert not circuit.allow()
    assert circuit.refusals == 2
    assert circuit.retry_after() == pytest.approx(10)
    clock.advance(4)
    assert circuit.retry_after() == pytest.approx(6)
    assert not circuit.allow()


def test_a_success_resets_the_consecutive_count() -> None:
    circuit, _ = breaker(FakeClock(), failure_threshold=3)
    fail(circuit, 2)
    circuit.record_success()
    fail(circuit, 2)
    assert state(circuit) is BreakerState.CLOSED
    fail(circuit, 1)
    assert state(circuit) is BreakerState.OPEN


def test_half_open_probe_success_closes() -> None:
    clock = FakeClock()
    circuit, seen = breaker(clock, failure_threshold=1, open_seconds=5)
    fail(circuit, 1)
    clock.advance(4.9)
    assert not circuit.allow()
    clock.advance(0.1)
    assert state(circuit) is BreakerState.HALF_OPEN
    assert circuit.retry_after() == 0.0
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # only one probe at a time
    circuit.record_success()
    assert state(circuit) is BreakerState.CLOSED
    assert circuit.allow()
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert state(circuit).level == 0


def test_half_open_probe_failure_reopens_for_another_period() -> None:
    clock = FakeClock()
    circuit, seen = breaker(clock, failure_threshold=2, open_seconds=5)
    fail(circuit, 2)
    clock.advance(5)
    assert circuit.allow()
    circuit.record_failure()
    assert state(circuit) is BreakerState.OPEN
    assert state(circuit).level == 2
    clock.advance(4)
    assert not circuit.allow()  # the new period counts from the probe's failure
    clock.advance(1)
    assert circuit.allow()
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open")]


def test_several_probes_must_all_succeed() -> None:
    clock = FakeClock()
    circuit, _ = breaker(clock, failure_threshold=1, open_seconds=1, half_open_probes=2)
    fail(circuit, 1)
    clock.advance(1)
    assert circuit.allow()
    assert circuit.allow()
    assert not circuit.allow()
    circuit.record_success()
    assert state(circuit) is BreakerState.HALF_OPEN
    assert state(circuit).level == 1
    circuit.record_success()
    assert state(circuit) is BreakerState.CLOSED


def test_a_lost_probe_is_given_up_after_open_seconds() -> None:
    clock = FakeClock()
    circuit, _ = breaker(clock, failure_threshold=1, open_seconds=3)
    fail(circuit, 1)
    clock.advance(3)
    assert circuit.allow()  # this probe's caller is cancelled: no outcome is ever recorded
    clock.advance(2.9)
    assert not circuit.allow()
    clock.advance(0.1)
    assert circuit.allow()
    circuit.record_success()
    assert state(circuit) is BreakerState.CLOSED


def test_late_results_while_open_are_ignored() -> None:
    clock = FakeClock()
    circuit, seen = breaker(clock, failure_threshold=1, open_seconds=5)
    fail(circuit, 1)
    clock.advance(2)
    circuit.record_success()  # a call admitted before the breaker opened
    circuit.record_failure()
    assert state(circuit) is BreakerState.OPEN
    clock.advance(3)  # still 5 s after opening, not after the late failure
    assert state(circuit) is BreakerState.HALF_OPEN
    assert seen == [("closed", "open"), ("open", "half_open")]


def test_window_mode_counts_failures_within_the_window_only() -> None:
    clock = FakeClock()
    circuit, _ = breaker(clock, failure_threshold=3, window_seconds=10, open_seconds=5)
    fail(circuit, 2)
    circuit.record_success()  # successes do not forgive failures in window mode
    clock.advance(10.5)  # both failures leave the window
    fail(circuit, 2)
    assert state(circuit) is BreakerState.CLOSED
    clock.advance(5)
    fail(circuit, 1)  # three within 10 s
    assert state(circuit) is BreakerState.OPEN


def test_after_closing_the_count_starts_again() -> None:
    clock = FakeClock()
    circuit, _ = breaker(clock, failure_threshold=2, open_seconds=1)
    fail(circuit, 2)
    clock.advance(1)
    assert circuit.allow()
    circuit.record_success()
    fail(circuit, 1)
    assert state(circuit) is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window_seconds": 0}, "window_seconds"),
        ({"open_seconds": 0}, "open_seconds"),
        ({"half_open_probes": 0}, "half_open_probes"),
    ],
)
def test_bad_settings_name_the_field(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        CircuitBreaker("x", **options)  # type: ignore[arg-type]


async def test_usable_from_a_coroutine_with_the_real_clock() -> None:
    circuit = CircuitBreaker("feature_store", failure_threshold=1, open_seconds=60)
    assert circuit.allow()
    circuit.record_failure()
    assert not circuit.allow()
    assert repr(circuit) == "CircuitBreaker('feature_store', state=open)"
