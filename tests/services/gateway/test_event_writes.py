"""ReportEvents' writes on a real Redis when the first attempt of a write fails the way a
failover makes it fail: held back past its budget (a `CLUSTER FAILOVER` pauses the old
master's writes; `CLIENT PAUSE WRITE` is the same pause on a single server), or applied with
its reply lost. The call succeeds within its deadline, and every event is applied once: in
the live history, in the event log, as an engager, not reported as its own duplicate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from recsys.feature_store import FeatureStoreUnavailable
from recsys.feature_store.event_log import RedisEventLog
from recsys.feature_store.redis_store import RedisFeatureStore
from services.gateway.events import EventIngestor, IncomingEvent
from services.gateway.metrics import gateway_metrics
from tests.recsys.feature_store import REDIS_URL, unique_prefix
from tests.support.redis_server import PrivateRedis

NOW = 1_750_000_000.0
NEW_ITEM = "new-1"


def ingestor_on(store: RedisFeatureStore) -> tuple[EventIngestor, RedisEventLog]:
    log = RedisEventLog(store)
    ingestor = EventIngestor(
        store,
        log,
        gateway_metrics(),
        known_item=lambda item: True,
        dedupe_seconds=600,
        clock=lambda: NOW,
        new_item=lambda item: item == NEW_ITEM,
    )
    return ingestor, log


def event(event_id: str, user: str = "u1", item: str = "item-1", kind: str = "click") -> IncomingEvent:
    return IncomingEvent(event_id, user, item, kind, 0.0, NOW)


async def settle(store: RedisFeatureStore) -> None:
    """Until the attempts the store stopped waiting for have been answered (they are never
    cut off, so they may still be applied after the call returned)."""
    for _ in range(500):
        if not store._background:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("attempts left behind never finished")


async def live_event_ids(store: RedisFeatureStore, user: str) -> list[str]:
    state = await store.user_state("v1", user, now=NOW)
    return [live.event_id for live in state.live_events]


async def test_a_write_pause_longer_than_the_budget_is_outlasted_and_applies_once(
    private_redis: PrivateRedis,
) -> None:
    store = RedisFeatureStore(private_redis.url, unique_prefix(), write_timeout=0.1)
    ingestor, log = ingestor_on(store)
    admin = Redis.from_url(private_redis.url)
    try:
        await ingestor.ingest([event("e0")], time_remaining=5.0)  # connections and scripts ready
        # As the old master during a failover: writes held for 4 budgets, then answered.
        await admin.execute_command("CLIENT", "PAUSE", "400", "WRITE")
        started = time.monotonic()
        outcome = await ingestor.ingest([event("e1")], time_remaining=5.0)
        elapsed = time.monotonic() - started
        assert (outcome.accepted, outcome.duplicates) == (1, 0)
        assert elapsed >= 0.3, elapsed  # the pause was met, and outlasted
        assert store.write_retries >= 1
        await settle(store)
        assert await live_event_ids(store, "u1") == ["e0", "e1"]
        assert [logged.event_id for logged in await log.read()] == ["e0", "e1"]
        again = await ingestor.ingest([event("e1")], time_remaining=5.0)
        assert (again.accepted, again.duplicates) == (0, 1)  # and still deduplicated
    finally:
        await admin.aclose()
        await store.close()


async def test_the_retries_end_within_the_callers_deadline(private_redis: PrivateRedis) -> None:
    store = RedisFeatureStore(private_redis.url, unique_prefix(), write_timeout=0.1)
    ingestor, _ = ingestor_on(store)
    admin = Redis.from_url(private_redis.url)
    try:
        await ingestor.ingest([event("e0")], time_remaining=5.0)
        await admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
        started = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable):
            await ingestor.ingest([event("e1")], time_remaining=0.3)
        assert time.monotonic() - started < 0.3  # answered before the caller gives up
        assert store.write_retries >= 1
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await store.close()


class LostReplies:
    """While armed, the first reply to each distinct command naming `marker` is lost after
    Redis ran the command (the connection drops as the reply arrives): what a master dying
    or a connection cut mid-reply looks like. The same command sent again is answered."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.armed = False
        self.lost = 0
        self._seen: set[bytes] = set()
        self._last_sent: dict[int, bytes] = {}

    def sent(self, connection: AbstractConnection, command: Any) -> None:
        packed = b"".join(command) if isinstance(command, list) else bytes(command)
        self._last_sent[id(connection)] = packed

    def lose(self, connection: AbstractConnection) -> bool:
        packed = self._last_sent.pop(id(connection), b"")
        if not self.armed or self.marker not in packed or packed in self._seen:
            return False
        self._seen.add(packed)
        self.lost += 1
        return True


@pytest.fixture
def lost_replies(monkeypatch: pytest.MonkeyPatch, prefix: str) -> LostReplies:
    fault = LostReplies(prefix)
    send, read = AbstractConnection.send_packed_command, AbstractConnection.read_response

    async def sending(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        fault.sent(self, command)
        await send(self, command, check_health)

    async def reading(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        response = await read(self, *args, **kwargs)
        if fault.lose(self):
            await self.disconnect()
            raise RedisConnectionError("reply lost (injected)")
        return response

    monkeypatch.setattr(AbstractConnection, "send_packed_command", sending)
    monkeypatch.setattr(AbstractConnection, "read_response", reading)
    return fault


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisFeatureStore]:
    redis = RedisFeatureStore(REDIS_URL, prefix, write_timeout=1.0)
    yield redis
    await redis.close()


async def test_event_writes_whose_replies_are_lost_are_retried_and_apply_once(
    store: RedisFeatureStore, lost_replies: LostReplies
) -> None:
    ingestor, log = ingestor_on(store)
    # Scripts loaded, connections open (a first reply lost to NOSCRIPT would apply nothing).
    await ingestor.ingest([event("e0", user="u0", item=NEW_ITEM)], time_remaining=5.0)
    lost_replies.armed = True
    outcome = await ingestor.ingest(
        [event("e1", item=NEW_ITEM), event("e2", item="item-2", kind="impression")], time_remaining=5.0
    )
    lost_replies.armed = False
    # Every write lost its first reply: marking, appending, exposures, engagers, the log.
    assert lost_replies.lost == 5
    assert store.write_retries == 5
    assert (outcome.accepted, outcome.duplicates) == (2, 0)  # not its own duplicates
    await settle(store)
    assert await live_event_ids(store, "u1") == ["e1"]  # once (impressions are not history)
    state = await store.user_state("v1", "u1", now=NOW)
    assert state.exposure_filter is not None
    assert state.exposure_filter.contains(["item-2"]).tolist() == [True]
    assert (await store.engagers())[NEW_ITEM] == ("u0", "u1")
    assert [logged.event_id for logged in await log.read()] == ["e0", "e1", "e2"]


async def test_a_write_refused_for_good_is_not_retried(store: RedisFeatureStore, prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.rpush(f"{prefix}:evt:1:u:bad", "not a marker")  # WRONGTYPE for SET … GET
    finally:
        await client.aclose()
    started = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable, match="WRONGTYPE"):
        await store.mark_events_seen(["1:u:bad"], 60, deadline=time.monotonic() + 5.0)
    assert time.monotonic() - started < 0.5
    assert store.write_retries == 0
