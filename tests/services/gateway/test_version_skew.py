"""A release as it happens in production: the build moves CURRENT, push-features runs after
(and may fail). The tier is `recsys up --redis` (real processes, a real Redis) under a steady
stream of Recommend calls throughout."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from recsys.artifacts import load_core
from recsys.feature_store.push import PushProgress, push_core, push_features
from recsys.feature_store.redis_store import RedisFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.recsys.feature_store import REDIS_URL
from tests.support.stack import UpProcess, start_up

pytestmark = pytest.mark.slow

POLL_SECONDS = 0.3
USERS = ("196", "186", "22", "244", "166", "298", "115", "253")


def recall_calls(metrics_port: int) -> dict[str, float]:
    """Recall calls the recall process handled, by status code (from its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Recall"' in line:
            code = line.split('grpc_code="', 1)[1].split('"', 1)[0]
            counts[code] = counts.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


class FailedPush(RuntimeError):
    pass


async def test_a_release_serves_one_version_end_to_end_with_no_fallback_and_no_doubled_calls(
    quick_candidate: Any, tmp_path: Path, prefix: str, stacks: list[UpProcess]
) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "store", create=True)
    first = publish(quick_candidate, store.path).version
    polls = {f"RECSYS_{name}_POLL_SECONDS": str(POLL_SECONDS) for name in ("RECALL", "RANK", "GATEWAY")}
    up = start_up(store.path, REDIS_URL, prefix, metrics=True, env=polls)
    stacks.append(up)
    await asyncio.to_thread(up.wait_serving)
    recall_metrics = up.ports["metrics"] + 1

    answers: list[tuple[float, gateway_pb2.RecommendResponse]] = []
    stop = asyncio.Event()
    async with aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)

        async def steady_load() -> None:
            index = 0
            while not stop.is_set():
                request = gateway_pb2.RecommendRequest(
                    user_id=USERS[index % len(USERS)], count=10, dry_run=True
                )
                answers.append((time.monotonic(), await stub.Recommend(request, timeout=5)))
                index += 1
                await asyncio.sleep(0.02)

        load = asyncio.ensure_future(steady_load())
        await asyncio.sleep(1.0)

        # 1. The build moves CURRENT; its features are not pushed yet.
        second = publish(quick_candidate, store.path).version
        await asyncio.sleep(8 * POLL_SECONDS)

        # 2. The push starts and fails half-way: some snapshots in, no ready marker.
        def fail_after_first_batch(progress: PushProgress) -> None:
            raise FailedPush(f"push of {progress.version} failed after {progress.done} users")

        redis = RedisFeatureStore(REDIS_URL, prefix, read_timeout=5.0, write_timeout=5.0)
        try:
            with pytest.raises(FailedPush):
                await push_core(
                    redis,
                    second,
                    load_core(store.version_path(second)),
                    batch=100,
                    progress=fail_after_first_batch,
                )
        finally:
            await redis.close()
        await asyncio.sleep(8 * POLL_SECONDS)
        assert {answer.model_version for _, answer in answers} == {first}

        # 3. The push is run again and finishes: the tier switches.
        await push_features(store.path, second, REDIS_URL, prefix)
        pushed_at = time.monotonic()
        async with asyncio.timeout(60):
            while answers[-1][1].model_version != second:
                await asyncio.sleep(0.05)
        switched_after = answers[-1][0] - pushed_at
        await asyncio.sleep(1.0)
        stop.set()
        await load

    versions = [answer.model_version for _, answer in answers]
    assert set(versions) == {first, second}
    first_new = versions.index(second)
    assert set(versions[first_new:]) == {second}, "the gateway went back to the old version"
    degraded = [
        (version, list(answer.degraded_reasons))
        for version, (_, answer) in zip(versions, answers, strict=True)
        if answer.degraded_reasons
    ]
    assert degraded == []
    fallback = [answer for _, answer in answers if any("fallback" in item.channels for item in answer.items)]
    assert fallback == []
    # One Recall call per Recommend: none was refused for naming a version recall lacked.
    calls = recall_calls(recall_metrics)
    assert calls == {"OK": float(len(answers))}
    print(
        f"switched {switched_after:.2f} s after the push ended (poll {POLL_SECONDS} s), {len(answers)} calls"
    )
