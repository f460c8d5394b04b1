"""The stack on a real Redis Cluster (three masters, three replicas on loopback): features
pushed into it, Recommend and ReportEvents through it, and a master failed over while a
closed loop of callers keeps recommending and clicking."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio

from recsys.artifacts import load_core
from recsys.feature_store.push import push_core
from recsys.feature_store.redis_store import RedisFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2
from tests.recsys.feature_store import delete_prefix, unique_prefix
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack
from tests.support.redis_cluster import PrivateRedisCluster


@pytest.fixture
async def cluster_stack(
    redis_cluster: PrivateRedisCluster, quick_store: ModelStore, tmp_path: Path
) -> AsyncIterator[Stack]:
    """recall + rank + gateway on the cluster with the store's own budgets (reads 50 ms,
    writes 200 ms: what a failover has to fit in), the version's features pushed first."""
    prefix = unique_prefix()
    features = RedisFeatureStore(redis_cluster.url, prefix)
    pusher = RedisFeatureStore(redis_cluster.url, prefix, read_timeout=10.0, write_timeout=10.0)
    version = quick_store.current()
    assert version is not None
    try:
        await push_core(pusher, version, load_core(quick_store.version_path(version)))
        running = await start_stack(quick_store, tmp_path, features, breaker_open_seconds=0.3)
        yield running
        await stop_stack(running)
    finally:
        await pusher.close()
        await features.close()
        await delete_prefix(prefix, redis_cluster.url)


def click(user: str, item: str) -> gateway_pb2.ReportEventsRequest:
    event = gateway_pb2.Event(
        event_id=f"click-{user}-{item}-{time.time_ns()}",
        user_id=user,
        item_id=item,
        type=gateway_pb2.EVENT_TYPE_CLICK,
    )
    return gateway_pb2.ReportEventsRequest(events=[event])


async def test_recommend_and_events_run_on_the_cluster(cluster_stack: Stack) -> None:
    stack = cluster_stack
    features = stack.features
    assert isinstance(features, RedisFeatureStore)
    assert features.cluster
    first = await stack.recommend("196", count=20, dry_run=True)
    assert list(first.degraded_reasons) == []
    assert not first.cold_start  # the user's snapshot was read from the cluster
    assert len(first.items) == 20
    clicked = first.items[0].item_id
    answer = await stack.stub.ReportEvents(click("196", clicked), timeout=5)
    assert answer.accepted == 1
    state = await features.user_state(stack.model.version, "196", now=time.time())
    assert [event.item_id for event in state.live_events] == [clicked]
    second = await stack.recommend("196", count=20, dry_run=True)
    assert list(second.degraded_reasons) == []
    after = [item.item_id for item in second.items]
    assert clicked not in after  # consumed now
    assert after != [item.item_id for item in first.items]
    # Exposures go through the cluster too: what was shown is not shown again.
    shown = await stack.recommend("196", count=10)
    await stack.settle()
    again = await stack.recommend("196", count=10, dry_run=True)
    assert not {item.item_id for item in shown.items} & {item.item_id for item in again.items}


@dataclass
class LoopRecord:
    calls: int = 0
    failed: list[str] = field(default_factory=list)
    degraded: Counter[str] = field(default_factory=Counter)
    degraded_times: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)


async def closed_loop(stack: Stack, users: list[str], until: float, record: LoopRecord, seed: int) -> None:
    """One caller: Recommend a random user, click the first item, again, until `until`."""
    chooser = random.Random(seed)
    while time.monotonic() < until:
        user = chooser.choice(users)
        started = time.monotonic()
        try:
            response = await stack.recommend(user, count=10)
            record.latencies.append((started, time.monotonic() - started))
            record.calls += 1
            if response.degraded_reasons:
                record.degraded.update(response.degraded_reasons)
                record.degraded_times.append(started)
            if response.items:
                record.calls += 1
                await stack.stub.ReportEvents(click(user, response.items[0].item_id), timeout=5)
        except aio.AioRpcError as error:
            record.failed.append(f"{error.code().name}: {error.details()}")


@pytest.mark.slow
async def test_a_master_fails_over_under_load_with_no_failed_call(
    cluster_stack: Stack, redis_cluster: PrivateRedisCluster
) -> None:
    """Four callers run Recommend + ReportEvents for 6 s; after 2 s one master is failed over
    (`CLUSTER FAILOVER` on its replica). No call may fail; answers degraded meanwhile are
    allowed when flagged, and counted (printed: `pytest -s` shows the figures)."""
    stack = cluster_stack
    users = [str(user) for user in stack.model.core.users.user_ids[:300]]
    record = LoopRecord()
    started = time.monotonic()
    until = started + 6.0
    callers = [asyncio.create_task(closed_loop(stack, users, until, record, seed)) for seed in range(4)]
    await asyncio.sleep(2.0)
    (master, *_) = redis_cluster.master_nodes()
    failover_started = time.monotonic()
    replica = await asyncio.to_thread(redis_cluster.manual_failover, master)
    failover_seconds = time.monotonic() - failover_started
    await asyncio.gather(*callers)

    assert redis_cluster.roles()[replica.port] == "master"
    assert redis_cluster.roles()[master.port] == "slave"
    assert record.failed == [], Counter(record.failed)
    assert record.calls > 50  # the loop really ran through the failover
    after = [seconds for begun, seconds in record.latencies if begun > failover_started + failover_seconds]
    assert after, "no call after the failover"
    before = [seconds for begun, seconds in record.latencies if begun < failover_started]
    during = [
        seconds
        for begun, seconds in record.latencies
        if failover_started - 0.5 <= begun <= failover_started + failover_seconds + 0.5
    ]
    degraded_after = [
        moment - failover_started for moment in record.degraded_times if moment >= failover_started
    ]
    features = stack.features
    assert isinstance(features, RedisFeatureStore)
    print(
        f"\ncluster failover under load: {record.calls} calls, 0 failed; failover "
        f"{failover_seconds * 1000:.0f} ms (CLUSTER FAILOVER → replica is master and cluster ok); "
        f"degraded answers {len(record.degraded_times)} ({len(degraded_after)} after the failover "
        f"began, the last {max(degraded_after, default=0.0) * 1000:.0f} ms after it), reasons "
        f"{dict(record.degraded)}; "
        f"Recommend max latency before {max(before) * 1000:.0f} ms, around the failover "
        f"{max(during, default=0.0) * 1000:.0f} ms; event writes retried {features.write_retries} times"
    )
