"""The after-answer writes: bounded, in order per answer, dropped and counted on overflow."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from recsys.feature_store import CatalogueItem, FeatureStoreUnavailable
from recsys.feature_store.memory import InProcessFeatureStore
from services.gateway.metrics import gateway_metrics
from services.gateway.side_effects import AnswerRecorder, AnswerWrites


class HeldStore(InProcessFeatureStore):
    """The in-process store whose exposure writes wait until the test lets them go, as a
    slow Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writes_started = 0

    async def record_exposures(
        self, user_id: str, item_ids: Sequence[str], now: float, *, deadline: float | None = None
    ) -> None:
        self.writes_started += 1
        await self.release.wait()
        await super().record_exposures(user_id, item_ids, now)


def _dropped() -> float:
    metrics = gateway_metrics()
    return float(metrics.side_effects_dropped._value.get())


async def test_a_full_queue_drops_and_counts_instead_of_piling_up() -> None:
    store = HeldStore()
    recorder = AnswerRecorder(store, gateway_metrics(), capacity=3, writers=1)
    before = _dropped()
    accepted = [recorder.submit(AnswerWrites(f"u{n}", [f"i{n}"], [(f"c{n}", 1.0)], 1000.0)) for n in range(6)]
    await asyncio.sleep(0.01)
    # The writer starts only once the six are submitted: three fill the queue, three are dropped;
    # then the writer takes the first off the queue and is held there.
    assert accepted == [True, True, True, False, False, False]
    assert recorder.dropped == 3
    assert _dropped() == before + 3
    assert store.writes_started == 1
    store.release.set()
    await recorder.drain()
    assert recorder.pending == 0
    for n in range(3):  # the accepted answers' writes all landed, exposures and cache alike
        state = await store.user_state("v", f"u{n}", now=1000.0)
        assert [item for item, _ in state.cache_items] == [f"c{n}"]
    for n in range(3, 6):
        state = await store.user_state("v", f"u{n}", now=1000.0)
        assert list(state.cache_items) == []


def test_a_recorder_needs_room_and_writers() -> None:
    with pytest.raises(ValueError, match="capacity"):
        AnswerRecorder(InProcessFeatureStore(), gateway_metrics(), capacity=0)


class ImpressionsDown(InProcessFeatureStore):
    """The in-process store whose impression counts cannot be written (Redis refusing them)."""

    async def add_item_impressions(self, counts: object) -> None:
        raise FeatureStoreUnavailable("down for the test")


async def test_new_item_impressions_are_counted_after_the_other_writes_and_a_failure_only_counted() -> None:
    store = InProcessFeatureStore()
    await store.upsert_items([CatalogueItem("new-a"), CatalogueItem("new-b")], 1000.0)
    recorder = AnswerRecorder(store, gateway_metrics(), writers=1)
    for _ in range(3):
        recorder.submit(AnswerWrites("u1", ["i1", "new-a"], [], 1000.0, ["new-a"]))
    recorder.submit(AnswerWrites("u2", ["new-b", "new-a"], [], 1000.0, ["new-b", "new-a"]))
    recorder.submit(AnswerWrites("u3", ["i1"], [], 1000.0))
    await recorder.drain()
    assert await store.item_impressions(["new-a", "new-b"]) == [4, 1]

    failing = ImpressionsDown()
    errors = gateway_metrics().side_effect_errors.labels("new_item_impressions")
    before = errors._value.get()
    recorder = AnswerRecorder(failing, gateway_metrics(), writers=1)
    recorder.submit(AnswerWrites("u1", ["new-a"], [("c1", 1.0)], 1000.0, ["new-a"]))
    await recorder.drain()
    assert errors._value.get() == before + 1
    # The answer's other writes landed: only the count is lost.
    state = await failing.user_state("v", "u1", now=1000.0)
    assert [item for item, _ in state.cache_items] == ["c1"]
