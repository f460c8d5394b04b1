"""Rank backed by the real Redis after `push-features`: the switch waits for the push, and a
live event read from Redis becomes part of the history the ranker sees."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from grpc import aio

from recsys.feature_store import LiveEvent, open_feature_store
from recsys.feature_store.push import push_features
from recsys.stages.query import liked_mask
from recsys.store import ModelStore
from recsys.v1 import rank_pb2, rank_pb2_grpc
from services.common.server import GrpcHost
from services.rank.app import RankApp
from services.rank.settings import RankSettings
from tests.recsys.feature_store import REDIS_URL
from tests.support.hosts import wait_until_serving


async def test_rank_switches_after_push_and_scores_live_history_from_redis(
    quick_store: ModelStore, prefix: str
) -> None:
    settings = RankSettings(
        store=str(quick_store.path),
        port=0,
        metrics_port=None,
        redis=REDIS_URL,
        redis_prefix=prefix,
        poll_seconds=0.1,
    )
    app = RankApp(settings)
    host = GrpcHost(app, settings)
    await host.start()
    try:
        await asyncio.sleep(0.5)
        assert not host.readiness.serving  # features not pushed yet: NOT_SERVING
        await push_features(quick_store.path, None, REDIS_URL, prefix)
        await wait_until_serving(host)
        model = app.versions.get().model
        user_id, user = "196", model.user_lookup["196"]
        stored = np.asarray(model.core.history.items.row(user))
        clicked = next(
            index for index in np.argsort(-model.core.popularity.global_scores) if index not in stored
        )
        items = np.asarray(
            [int(clicked), *model.core.itemcf.neighbors[clicked][:40].tolist()], dtype=np.int64
        )
        items = items[items >= 0]
        async with aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = rank_pb2_grpc.RankStub(channel)
            request = rank_pb2.RankRequest(user_id=user_id, item_indexes=items.tolist())
            before = await stub.Rank(request, timeout=5)
            store = open_feature_store(REDIS_URL, prefix=prefix)
            event = LiveEvent(str(model.core.catalogue.item_ids[clicked]), "click", 1.0, time.time(), "e1")
            await store.append_events(user_id, [event])
            await store.close()
            after = await stub.Rank(request, timeout=5)
        # What the ranker must have seen: the stored history, then the click (liked).
        length = model.spec.history_length
        history = np.append(stored, clicked)[-length:]
        ratings = np.asarray(model.core.history.ratings.row(user))
        liked = np.append(liked_mask(model.core.like_threshold, ratings), True)[-length:]
        inputs = model.user_features.inputs(user, history, liked)
        expected = model.score(inputs, items)
        actual = {task.task: np.asarray(task.scores) for task in after.task_scores}
        for head in model.spec.heads:
            np.testing.assert_allclose(actual[head], expected[head], rtol=0, atol=1e-6)
        assert np.abs(np.asarray(after.scores) - np.asarray(before.scores)).max() > 1e-4
    finally:
        await host.stop(grace=0)
