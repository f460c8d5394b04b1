"""The durable event log: one suite for the CSV file and the Redis stream (single Redis and\nCluster)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from recsys.feature_store.event_log import (
    EventLog,
    FileEventLog,
    LoggedEvent,
    RedisEventLog,
    event_log_for,
)
from recsys.feature_store.redis_store import RedisFeatureStore
from tests.recsys.feature_store import REDIS_URL, delete_prefix, unique_prefix


@pytest.fixture(params=["file", "redis", "cluster"])
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventLog]:
    if request.param == "file":
        yield FileEventLog(tmp_path / "events" / "events.csv")
        return
    # In a cluster the stream is one key, so one slot: its order is the order of appends.
    url = request.getfixturevalue("redis_cluster").url if request.param == "cluster" else REDIS_URL
    prefix = unique_prefix()
    store = RedisFeatureStore(url, prefix, read_timeout=1.0, write_timeout=1.0)
    try:
        yield RedisEventLog(store)
    finally:
        await store.close()
        await delete_prefix(prefix, url)


def logged(index: int, kind: str = "click", user: str = "u1") -> LoggedEvent:
    return LoggedEvent(
        time=1_750_000_000.123456 + index,
        user_id=user,
        item_id=f'item "{index}", with a comma',  # quoting must survive
        type=kind,
        value=4.5 if kind == "rating" else 1.0,
        event_id=f"e{index}",
        request_id="r1",
        scene="home",
        position=index,
        arm="dpp",
    )


async def test_appended_events_read_back_in_order_and_exactly(log: EventLog) -> None:
    first = [logged(0, "impression"), logged(1, "click")]
    second = [logged(2, "rating", user="ü-ser")]
    await log.append(first)
    await log.append([])
    await log.append(second)
    assert await log.read() == first + second
    assert await log.read(limit=2) == first


async def test_concurrent_appends_lose_nothing(log: EventLog) -> None:
    batches = [[logged(10 * batch + i) for i in range(10)] for batch in range(20)]
    await asyncio.gather(*(log.append(batch) for batch in batches))
    read = await log.read()
    assert len(read) == 200
    assert {event.event_id for event in read} == {f"e{i}" for i in range(200)}
    for batch in batches:  # each batch stays contiguous and in order
        start = read.index(batch[0])
        assert read[start : start + 10] == batch


def test_an_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="type: expected one of"):
        LoggedEvent(0.0, "u", "i", "purchase", 1.0, "e")


async def test_the_file_log_is_what_recsys_build_csv_reads(tmp_path: Path) -> None:
    log = FileEventLog(tmp_path / "events.csv")
    await log.append([logged(0), logged(1, "rating")])
    header = (tmp_path / "events.csv").read_text().splitlines()[0]
    assert header == "time,user_id,item_id,type,value,event_id,request_id,scene,position,arm"


async def test_event_log_for_picks_the_stream_beside_redis(tmp_path: Path) -> None:
    store = RedisFeatureStore(REDIS_URL, unique_prefix())
    try:
        assert isinstance(event_log_for(store, None), RedisEventLog)
    finally:
        await store.close()
    assert isinstance(event_log_for(object(), tmp_path / "e.csv"), FileEventLog)
    with pytest.raises(ValueError, match="file path"):
        event_log_for(object(), None)
