"""A Redis that comes back empty, under `recsys up --redis` (real processes, a private
redis-server that the test restarts and empties)."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from grpc import aio
from redis.asyncio import Redis

from recsys.feature_store.redis_store import RedisKeys
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.recsys.feature_store import unique_prefix
from tests.support.redis_server import PrivateRedis
from tests.support.stack import UpProcess, start_up

pytestmark = pytest.mark.slow

POLL_SECONDS = 0.3
KNOWN_USER = "196"  # has a history in MovieLens-100K


def scrape(port: int, name: str) -> dict[str, float]:
    """Samples of metric `name` (label text → value) on a /metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            labels, value = line.rsplit(" ", 1)
            samples[labels[len(name) :]] = float(value)
    return samples


async def test_a_lost_snapshot_is_flagged_served_from_the_version_and_pushed_again(
    quick_store: Any, private_redis: PrivateRedis, stacks: list[UpProcess]
) -> None:
    prefix = unique_prefix()
    polls = {f"RECSYS_{name}_POLL_SECONDS": str(POLL_SECONDS) for name in ("RECALL", "RANK", "GATEWAY")}
    up = start_up(quick_store.path, private_redis.url, prefix, metrics=True, env=polls)
    stacks.append(up)
    await asyncio.to_thread(up.wait_serving)
    version = quick_store.current()
    ready_key = RedisKeys(prefix).ready(version)
    lock_key = RedisKeys(prefix).push_lock(version)
    recall_metrics, rank_metrics = up.ports["metrics"] + 1, up.ports["metrics"] + 2

    async with aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)

        async def recommend() -> gateway_pb2.RecommendResponse:
            request = gateway_pb2.RecommendRequest(user_id=KNOWN_USER, count=10, dry_run=True)
            response: gateway_pb2.RecommendResponse = await stub.Recommend(request, timeout=5)
            return response

        async def until_clean() -> None:
            async with asyncio.timeout(60):
                while True:
                    answer = await recommend()
                    if not answer.degraded_reasons and not answer.cold_start:
                        return
                    await asyncio.sleep(0.1)

        before = await recommend()
        assert list(before.degraded_reasons) == []
        assert not before.cold_start

        # 1. A real restart without persistence: the services reconnect, find the version's
        # ready marker gone and push its features again by themselves.
        await asyncio.to_thread(private_redis.restart_empty)
        redis = Redis.from_url(private_redis.url)
        try:
            async with asyncio.timeout(60):
                while not await redis.exists(ready_key):
                    await recommend()  # answering all along
                    await asyncio.sleep(0.1)
            await until_clean()
            pushed = {
                port: scrape(port, "recsys_" + service + "_feature_snapshot_repushes_total")
                for port, service in ((recall_metrics, "recall"), (rank_metrics, "rank"))
            }
            assert (
                sum(
                    value
                    for samples in pushed.values()
                    for label, value in samples.items()
                    if "pushed" in label
                )
                == 1
            )

            # 2. Emptied again, while "another process" holds the push lock (atomically, so
            # no service can push in between): the loss is flagged, not served as cold start.
            async with redis.pipeline(transaction=True) as pipeline:
                pipeline.flushall()
                pipeline.set(lock_key, "another-pod", ex=120)
                await pipeline.execute()
            async with asyncio.timeout(30):
                while "recall:feature_snapshot_missing" not in (answer := await recommend()).degraded_reasons:
                    await asyncio.sleep(0.1)
            assert not answer.cold_start  # the version's own history stands in for the snapshot
            assert answer.items
            assert scrape(recall_metrics, "recsys_recall_feature_snapshot_ready") == {"": 0.0}
            await asyncio.sleep(4 * POLL_SECONDS)
            assert not await redis.exists(ready_key)  # the lock holder is left to push

            # 3. The lock is given up without a push (its holder died): a service pushes.
            await redis.delete(lock_key)
            await until_clean()
            assert await redis.exists(ready_key)
            assert scrape(recall_metrics, "recsys_recall_feature_snapshot_ready") == {"": 1.0}
        finally:
            await redis.aclose()
