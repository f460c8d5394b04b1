"""Recall backed by the real Redis after `push-features`: the switch waits for the push, and
live events and exposures from Redis shape the answer."""

from __future__ import annotations

import asyncio
import time

from grpc import aio

from recsys.feature_store import LiveEvent, open_feature_store
from recsys.feature_store.push import push_features
from recsys.store import ModelStore
from recsys.v1 import recall_pb2, recall_pb2_grpc
from services.common.server import GrpcHost
from services.recall.app import RecallApp
from services.recall.settings import RecallSettings
from tests.recsys.feature_store import REDIS_URL
from tests.support.hosts import wait_until_serving


async def test_recall_switches_after_push_and_reads_live_data_from_redis(
    quick_store: ModelStore, prefix: str
) -> None:
    version = quick_store.current()
    assert version is not None
    settings = RecallSettings(
        store=str(quick_store.path),
        port=0,
        metrics_port=None,
        redis=REDIS_URL,
        redis_prefix=prefix,
        poll_seconds=0.1,
    )
    app = RecallApp(settings)
    host = GrpcHost(app, settings)
    await host.start()
    try:
        await asyncio.sleep(0.5)
        assert not host.readiness.serving  # features not pushed yet: no switch, NOT_SERVING
        report = await push_features(quick_store.path, None, REDIS_URL, prefix)
        assert report.version == version
        await wait_until_serving(host)
        model = app.versions.get().model
        async with aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = recall_pb2_grpc.RecallStub(channel)
            before = await stub.Recall(recall_pb2.RecallRequest(user_id="196"), timeout=2)
            assert list(before.degraded_reasons) == []
            assert len(before.item_indexes) > 100
            # Items shown to the user are filtered out of the next answer.
            shown = [str(model.core.catalogue.item_ids[index]) for index in before.item_indexes[:20]]
            store = open_feature_store(REDIS_URL, prefix=prefix)
            await store.record_exposures("196", shown, time.time())
            # A click on an item makes it consumed: it never comes back.
            clicked_index = int(before.item_indexes[30])
            clicked = str(model.core.catalogue.item_ids[clicked_index])
            await store.append_events(
                "196", [LiveEvent(item_id=clicked, kind="click", value=1.0, time=time.time(), event_id="e1")]
            )
            await store.close()
            after = await stub.Recall(recall_pb2.RecallRequest(user_id="196"), timeout=2)
        returned = set(after.item_indexes)
        assert not returned & set(before.item_indexes[:20])
        assert clicked_index not in returned
        assert list(after.degraded_reasons) == []
    finally:
        await host.stop(grace=0)
