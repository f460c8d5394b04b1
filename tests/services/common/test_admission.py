"""The adaptive limit and its queue, on a clock driven by hand."""

from __future__ import annotations

import asyncio

import pytest

from services.common.admission import AdaptiveLimit, Admission, AdmissionPolicy, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_window_cuts_the_limit_and_a_busy_fast_window_adds_one() -> None:
    clock = Clock()
    policy = AdmissionPolicy(
        initial_limit=10, min_limit=2, max_limit=12, latency_target=0.05, window_calls=10
    )
    limit = AdaptiveLimit(policy, clock)
    for _ in range(10):
        limit.sample(0.2)
    assert limit.limit == 8  # 10 × 0.8
    for _ in range(10):  # fast but the limit unused: no growth (the work, not the limit, bounds it)
        limit.observe_load(in_flight=1, queued=0)
        limit.sample(0.001)
    assert limit.limit == 8
    for _ in range(50):
        limit.observe_load(in_flight=limit.limit, queued=3)
        limit.sample(0.001)
    assert limit.limit == 12  # +1 per busy window, capped at max_limit
    for _ in range(200):
        limit.sample(1.0)
    assert limit.limit == 2  # never below min_limit


def test_one_slow_call_in_ten_does_not_move_the_limit() -> None:
    """The window's p90 decides, so a lone straggler (a GC pause) is not taken for overload."""
    limit = AdaptiveLimit(AdmissionPolicy(initial_limit=10, window_calls=10, latency_target=0.05), Clock())
    for index in range(10):
        limit.sample(0.5 if index == 3 else 0.01)
    assert limit.limit == 10


def test_a_window_also_ends_after_window_seconds() -> None:
    clock = Clock()
    limit = AdaptiveLimit(AdmissionPolicy(initial_limit=10, window_calls=100, window_seconds=1.0), clock)
    limit.sample(0.3)
    assert limit.limit == 10
    clock.now = 1.5
    limit.sample(0.3)
    assert limit.limit == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 5, "max_limit": 4}, "min_limit"),
        ({"backoff": 1.0}, "backoff"),
        ({"latency_target": 0}, "latency_target"),
        ({"max_queue_seconds": -1}, "max_queue_seconds"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdmissionPolicy(**kwargs)  # type: ignore[arg-type]


async def test_queued_calls_get_slots_in_arrival_order_and_leave_when_their_caller_goes() -> None:
    admission = Admission(AdmissionPolicy(initial_limit=1, min_limit=1, max_limit=1))
    await admission.acquire(1.0)
    order: list[str] = []

    async def call(name: str) -> None:
        await admission.acquire(1.0)
        order.append(name)

    first = asyncio.create_task(call("first"))
    gone = asyncio.create_task(call("gone"))
    last = asyncio.create_task(call("last"))
    await asyncio.sleep(0)
    assert admission.queued == 3
    gone.cancel()
    await asyncio.sleep(0)
    assert admission.queued == 2
    admission.release(0.01)
    await first
    admission.release(0.01)
    await last
    assert order == ["first", "last"]
    assert admission.in_flight == 1
    assert admission.queued == 0


async def test_a_call_is_refused_when_its_deadline_cannot_cover_the_expected_wait() -> None:
    admission = Admission(AdmissionPolicy(initial_limit=1, min_limit=1, max_limit=1, latency_target=0.05))
    await admission.acquire(1.0)
    with pytest.raises(Refused) as refused:
        await admission.acquire(0.06)  # wait ≈ 50 ms + the call's own 50 ms > 60 ms
    assert refused.value.reason == "deadline"
    assert admission.queued == 0
    assert admission.in_flight == 1


async def test_a_queued_call_whose_time_runs_out_is_refused_and_its_slot_not_lost() -> None:
    admission = Admission(
        AdmissionPolicy(
            initial_limit=1, min_limit=1, max_limit=1, latency_target=0.01, max_queue_seconds=0.05
        )
    )
    await admission.acquire(1.0)
    with pytest.raises(Refused) as refused:
        await admission.acquire(1.0)
    assert refused.value.reason == "queue_timeout"
    admission.release(0.01)
    assert admission.in_flight == 0
    await admission.acquire(1.0)  # the slot is free again
    assert admission.in_flight == 1
