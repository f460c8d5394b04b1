"""The recall service on the real quick MovieLens-100K store, over real gRPC (port 0)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from recsys.feature_store import InProcessFeatureStore, LiveEvent, open_feature_store
from recsys.store import ModelStore
from recsys.v1 import common_pb2, recall_pb2, recall_pb2_grpc
from services.common.server import GrpcHost
from services.recall.app import RecallApp, limits_from
from services.recall.settings import RecallSettings

OK = recall_pb2.CHANNEL_STATUS_OK
TIMEOUT = recall_pb2.CHANNEL_STATUS_TIMEOUT


class Running:
    def __init__(self, app: RecallApp, host: GrpcHost, channel: aio.Channel) -> None:
        self.app, self.host, self.channel = app, host, channel
        self.stub = recall_pb2_grpc.RecallStub(channel)

    @property
    def model(self) -> Any:
        return self.app.versions.get().model


async def start(store: str, **settings: Any) -> Running:
    app = RecallApp(RecallSettings(store=store, port=0, metrics_port=None, poll_seconds=0.2, **settings))
    host = GrpcHost(app, app.settings)
    await host.start()
    async with asyncio.timeout(30):
        while not host.readiness.serving:
            await asyncio.sleep(0.05)
    return Running(app, host, aio.insecure_channel(f"127.0.0.1:{host.port}"))


@pytest.fixture
async def recall(quick_store: ModelStore) -> AsyncIterator[Running]:
    running = await start(str(quick_store.path))
    yield running
    await running.channel.close()
    await running.host.stop(grace=0)


def stats(response: recall_pb2.RecallResponse) -> dict[str, recall_pb2.ChannelStats]:
    return {stat.channel: stat for stat in response.channel_stats}


def channel_items(response: recall_pb2.RecallResponse, channel: str) -> set[int]:
    bit = list(response.channel_names).index(channel)
    return {
        item
        for item, mask in zip(response.item_indexes, response.channel_masks, strict=True)
        if mask >> bit & 1
    }


async def test_channels_return_sensible_items_and_never_consumed_ones(recall: Running) -> None:
    model = recall.model
    user_id = "196"
    user = model.user_lookup[user_id]
    history = np.asarray(model.core.history.items.row(user))
    # Explicit quotas: the merge tuned on validation may switch a channel off by default.
    item_to_item = ("itemcf", "swing", "ease", "two_tower")
    response = await recall.stub.Recall(
        recall_pb2.RecallRequest(
            user_id=user_id, max_candidates=1000, quotas=dict.fromkeys(item_to_item, 200)
        ),
        timeout=2,
    )
    assert not response.cold_start
    assert list(response.degraded_reasons) == []
    assert all(stats(response)[name].status == OK for name in item_to_item)
    assert len(response.user_embedding) == model.spec.embedding_dim
    returned = set(response.item_indexes)
    assert not returned & set(history.tolist()), "a consumed item came back"
    assert len(returned) == len(response.item_indexes), "duplicates in the merged list"
    # ItemCF: the neighbours (co-rated items) of the user's last item are among its candidates.
    last = int(history[-1])
    neighbours = [
        int(n) for n in model.core.itemcf.neighbors[last][:10] if n >= 0 and n not in set(history.tolist())
    ]
    assert set(neighbours[:5]) <= channel_items(response, "itemcf")
    # EASE: served like ItemCF, from its own table (B's top positive weights per item).
    assert "ease" in response.channel_names
    assert stats(response)["ease"].count > 0
    ease_items = channel_items(response, "ease")
    assert ease_items
    assert not ease_items & set(history.tolist())
    ease_neighbours = [
        int(n) for n in model.core.ease.neighbors[last][:10] if n >= 0 and n not in set(history.tolist())
    ]
    assert ease_neighbours
    assert set(ease_neighbours[:3]) <= ease_items
    # Geo: asked for by quota, its items are the popular items of the user's region.
    region = int(model.core.users.regions[user])
    geo = await recall.stub.Recall(recall_pb2.RecallRequest(user_id=user_id, quotas={"geo": 50}), timeout=2)
    region_list = set(np.asarray(model.core.popularity.by_region.row(region)).tolist())
    geo_items = channel_items(geo, "geo")
    assert stats(geo)["geo"].count == 50
    assert geo_items <= region_list
    assert len(geo_items) == 50


async def test_a_version_without_an_ease_table_is_served_without_the_channel(
    quick_candidate: Any, tmp_path: Path
) -> None:
    """A version published before the `ease` channel existed has no table: recall loads it and
    answers from the other channels, reporting `ease` as skipped, even when asked for it."""
    from training.build import publish

    candidate = dataclasses.replace(
        quick_candidate,
        core=dataclasses.replace(quick_candidate.core, ease=None),
        channels=tuple(name for name in quick_candidate.channels if name != "ease"),
    )
    publish(candidate, tmp_path / "store")
    running = await start(str(tmp_path / "store"))
    try:
        assert "ease" not in running.model.channels
        response = await running.stub.Recall(
            recall_pb2.RecallRequest(user_id="196", quotas={"ease": 100, "itemcf": 100}), timeout=2
        )
        assert stats(response)["ease"].status == recall_pb2.CHANNEL_STATUS_SKIPPED
        assert stats(response)["itemcf"].status == OK
        assert not channel_items(response, "ease")
        assert list(response.degraded_reasons) == []
    finally:
        await running.channel.close()
        await running.host.stop(grace=0)


async def test_an_unknown_user_gets_the_cold_start_channels(recall: Running) -> None:
    region = str(recall.model.core.users.region_vocab[0])
    request = recall_pb2.RecallRequest(user_id="never-seen", context=common_pb2.RequestContext(region=region))
    response = await recall.stub.Recall(request, timeout=2)
    assert response.cold_start
    assert stats(response)["popular"].status == OK
    assert stats(response)["geo"].count > 0
    assert stats(response)["itemcf"].status == recall_pb2.CHANNEL_STATUS_SKIPPED


async def test_an_unknown_user_with_live_clicks_gets_the_personalised_channels(recall: Running) -> None:
    """A user id the version has never seen, who clicked three items: recall queries from
    those clicks (the item-to-item channels find their neighbours, the user tower reads them
    beside user token 0), with the channel mix a known user gets, and passes them on as the
    history rank scores from."""
    model = recall.model
    user_id = f"live-only-{time.time_ns()}"
    assert user_id not in model.user_lookup
    clicked = [int(item) for item in np.asarray(model.core.popularity.global_top)[[20, 40, 60]]]
    now = time.time()
    await recall.app.features.append_events(
        user_id,
        [
            LiveEvent(str(model.core.catalogue.item_ids[item]), "click", 1.0, now - 10 + n, f"{user_id}-{n}")
            for n, item in enumerate(clicked)
        ],
    )
    region = str(model.core.users.region_vocab[0])
    # Explicit quotas: the merge tuned on validation may switch a channel off by default.
    quotas = dict.fromkeys(("itemcf", "swing", "ease", "two_tower", "geo", "popular"), 100)
    request = recall_pb2.RecallRequest(
        user_id=user_id,
        context=common_pb2.RequestContext(region=region),
        max_candidates=1000,
        quotas=quotas,
    )
    response = await recall.stub.Recall(request, timeout=2)
    assert not response.cold_start
    assert list(response.degraded_reasons) == []
    known = await recall.stub.Recall(
        recall_pb2.RecallRequest(user_id="196", max_candidates=1000, quotas=quotas), timeout=2
    )
    ran = {name for name, stat in stats(response).items() if stat.status == OK}
    assert ran == {name for name, stat in stats(known).items() if stat.status == OK}
    assert {"itemcf", "swing", "ease", "two_tower"} <= ran
    assert not set(response.item_indexes) & set(clicked), "a clicked item came back"
    neighbours = {int(n) for item in clicked for n in model.core.itemcf.neighbors[item][:5] if n >= 0} - set(
        clicked
    )
    assert neighbours <= channel_items(response, "itemcf")
    # The history rank gets: the clicks, liked, with the request's region for none stored.
    assert list(response.history.item_indexes) == clicked
    assert list(response.history.liked) == [True, True, True]
    # The user tower ran on token 0 and the clicks, in the request's region.
    inputs = model.user_features.inputs(
        -1, np.asarray(clicked), np.ones(3, bool), model.region_lookup[region]
    )
    assert inputs["user_id"].tolist() == [0]
    np.testing.assert_allclose(
        np.asarray(response.user_embedding), model.user_embeddings([inputs])[0], rtol=0, atol=1e-5
    )


async def test_exclusions_are_honoured(recall: Running) -> None:
    first = await recall.stub.Recall(recall_pb2.RecallRequest(user_id="196"), timeout=2)
    excluded = list(first.item_indexes[:30])
    second = await recall.stub.Recall(
        recall_pb2.RecallRequest(user_id="196", exclude_item_indexes=excluded), timeout=2
    )
    assert not set(excluded) & set(second.item_indexes)


async def test_a_slow_channel_is_cut_at_its_deadline(recall: Running) -> None:
    recall.app.engine.channel_delays["swing"] = 1.0
    quotas = {"itemcf": 100, "swing": 100, "two_tower": 100, "geo": 50, "popular": 50}
    try:
        started = time.perf_counter()
        response = await recall.stub.Recall(recall_pb2.RecallRequest(user_id="196", quotas=quotas), timeout=2)
        elapsed = time.perf_counter() - started
    finally:
        recall.app.engine.channel_delays.clear()
    assert stats(response)["swing"].status == TIMEOUT
    assert "channel_timeout:swing" in response.degraded_reasons
    # Only the slow channel is lost: the others share the remaining worker.
    for name in ("itemcf", "two_tower", "geo", "popular"):
        assert stats(response)[name].status == OK, name
    assert len(response.item_indexes) > 0
    assert elapsed < 0.5  # the channel timeout is 50 ms; the swing channel would take 1 s


async def test_each_channel_has_its_own_deadline(recall: Running) -> None:
    engine = recall.app.engine
    defaults = engine.limits
    engine.limits = dataclasses.replace(defaults, channel_timeouts={"two_tower": 0.01})
    engine.channel_delays["two_tower"] = 0.03  # over its own 10 ms, under the default 50 ms
    engine.channel_delays["itemcf"] = 0.03
    try:
        response = await recall.stub.Recall(
            recall_pb2.RecallRequest(user_id="196", quotas={"itemcf": 100, "two_tower": 100}), timeout=2
        )
    finally:
        engine.limits = defaults
        engine.channel_delays.clear()
    assert stats(response)["two_tower"].status == TIMEOUT
    assert list(response.user_embedding) == []  # a late two-tower result is dropped whole
    assert stats(response)["itemcf"].status == OK


async def test_the_cache_channel_serves_unshown_items_a_limited_number_of_times(recall: Running) -> None:
    model = recall.model
    user_id = "196"
    history = set(np.asarray(model.core.history.items.row(model.user_lookup[user_id])).tolist())
    unseen = [i for i in np.argsort(-model.core.popularity.global_scores) if int(i) not in history]
    cached = [str(model.core.catalogue.item_ids[i]) for i in unseen[-3:]]  # unpopular: no other channel
    features = recall.app.features
    assert isinstance(features, InProcessFeatureStore)
    await features.put_cache(user_id, [(item, 1.0 - 0.1 * n) for n, item in enumerate(cached)], time.time())
    request = recall_pb2.RecallRequest(user_id=user_id, quotas={"cache": 10})
    expected = {model.item_lookup[item] for item in cached}
    dry = recall_pb2.RecallRequest(user_id=user_id, quotas={"cache": 10}, dry_run=True)
    for _ in range(features.policy.cache_max_uses + 2):  # dry runs use nothing up
        assert channel_items(await recall.stub.Recall(dry, timeout=2), "cache") == expected
    answers = [
        await recall.stub.Recall(request, timeout=2) for _ in range(features.policy.cache_max_uses + 1)
    ]
    for response in answers[:-1]:
        assert channel_items(response, "cache") == expected
        assert stats(response)["cache"].status == OK
    assert channel_items(answers[-1], "cache") == set()  # every reuse spent
    assert stats(answers[-1])["cache"].count == 0


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("user_id", recall_pb2.RecallRequest(user_id="")),
        ("quotas[itemcf]", recall_pb2.RecallRequest(user_id="1", quotas={"itemcf": -1})),
        ("quotas[bogus]", recall_pb2.RecallRequest(user_id="1", quotas={"bogus": 1})),
        ("quotas[geo]", recall_pb2.RecallRequest(user_id="1", quotas={"geo": 100_000})),
        ("prerank_keep", recall_pb2.RecallRequest(user_id="1", prerank_keep=-1)),
        ("prerank_keep", recall_pb2.RecallRequest(user_id="1", prerank_keep=100_000)),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    recall: Running, field: str, request_: recall_pb2.RecallRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await recall.stub.Recall(request_, timeout=2)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")


async def test_prerank_keep_answers_the_pre_rank_cut_of_the_merged_candidates(recall: Running) -> None:
    from recsys.stages.prerank import EmbeddingPreRanker

    quotas = dict.fromkeys(("itemcf", "swing", "ease", "two_tower", "geo", "popular"), 200)
    request = recall_pb2.RecallRequest(user_id="196", max_candidates=1000, quotas=quotas, dry_run=True)
    everything = await recall.stub.Recall(request, timeout=2)
    request.prerank_keep = 150
    cut = await recall.stub.Recall(request, timeout=2)
    assert len(everything.item_indexes) > 150
    assert list(cut.degraded_reasons) == []
    # The same cut rank makes: the 150 best by the embedding dot product, in the merged order,
    # each with its own merged score, channels and provenance row.
    embedding = np.asarray(everything.user_embedding, np.float32)
    np.testing.assert_array_equal(np.asarray(cut.user_embedding, np.float32), embedding)
    items = np.asarray(everything.item_indexes, np.int64)
    kept = EmbeddingPreRanker(recall.model.item_embeddings).keep_positions(items, embedding, 150)
    assert list(cut.item_indexes) == items[kept].tolist()
    np.testing.assert_array_equal(np.asarray(cut.scores), np.asarray(everything.scores)[kept])
    assert list(cut.channel_masks) == np.asarray(everything.channel_masks)[kept].tolist()
    columns = len(everything.provenance.channels)
    ranks = np.frombuffer(everything.provenance.ranks, "<i2").reshape(-1, columns)
    assert np.frombuffer(cut.provenance.ranks, "<i2").reshape(-1, columns).tolist() == ranks[kept].tolist()
    # A cold-start user has no embedding: nothing to cut by, every merged candidate returns.
    cold = await recall.stub.Recall(recall_pb2.RecallRequest(user_id="nobody", prerank_keep=10), timeout=2)
    assert cold.cold_start
    assert len(cold.item_indexes) > 10


async def test_an_unknown_model_version_is_failed_precondition(recall: Running) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await recall.stub.Recall(recall_pb2.RecallRequest(user_id="1", model_version="v0"), timeout=2)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_with_redis_down_the_answer_arrives_in_time_and_flagged(quick_store: ModelStore) -> None:
    app = RecallApp(
        RecallSettings(store=str(quick_store.path), port=0, metrics_port=None),
        features=open_feature_store("redis://127.0.0.1:1/0", read_timeout=0.02),
    )
    # The version is loaded regardless of the feature store here (no ready check in this test).
    app.versions._ready_check = None
    host = GrpcHost(app, app.settings)
    await host.start()
    try:
        async with asyncio.timeout(30):
            while not host.readiness.serving:
                await asyncio.sleep(0.05)
        async with aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            started = time.perf_counter()
            response = await recall_pb2_grpc.RecallStub(channel).Recall(
                recall_pb2.RecallRequest(user_id="196"), timeout=0.5
            )
            elapsed = time.perf_counter() - started
        assert "feature_store_unavailable" in response.degraded_reasons
        assert "exposure_filter_unavailable" in response.degraded_reasons
        assert len(response.item_indexes) > 100  # CF on the profile the model version has
        assert elapsed < 0.5
    finally:
        await host.stop(grace=0)


async def test_a_version_swap_under_50_concurrent_callers_fails_no_call(
    quick_candidate: Any, tmp_path: Path
) -> None:
    from training.build import publish

    store = tmp_path / "store"
    first = publish(quick_candidate, store).version
    running = await start(str(store))
    try:
        stop = asyncio.Event()
        versions_seen: set[str] = set()
        failures: list[BaseException] = []

        async def caller(index: int) -> None:
            while not stop.is_set():
                try:
                    response = await running.stub.Recall(
                        recall_pb2.RecallRequest(user_id=str(1 + index % 900)), timeout=5
                    )
                    versions_seen.add(response.model_version)
                except Exception as error:  # any failed call fails the test
                    failures.append(error)

        callers = [asyncio.create_task(caller(index)) for index in range(50)]
        await asyncio.sleep(0.5)
        second = await asyncio.to_thread(lambda: publish(quick_candidate, store).version)
        async with asyncio.timeout(60):
            while running.app.versions.get().version != second:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*callers)
        assert failures == []
        assert versions_seen == {first, second}
    finally:
        await running.channel.close()
        await running.host.stop(grace=0)


def test_per_channel_deadlines_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RECALL_CHANNEL_TIMEOUTS_MS", '{"two_tower": 30, "swing": 20}')
    limits = limits_from(RecallSettings())
    assert limits.timeout_for("two_tower") == pytest.approx(0.03)
    assert limits.timeout_for("swing") == pytest.approx(0.02)
    assert limits.timeout_for("itemcf") == limits.channel_timeout
    monkeypatch.setenv("RECSYS_RECALL_CHANNEL_TIMEOUTS_MS", '{"bogus": 30}')
    with pytest.raises(ValueError, match="unknown channel 'bogus'"):
        RecallSettings()


def _expired(service: str, stage: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "recsys_server_expired_work_total", {"service": service, "stage": stage}
    )
    return value or 0.0


class SlowStore(InProcessFeatureStore):
    """The in-process feature store, answering user-state reads after `delay` seconds (a slow
    Redis)."""

    delay = 0.0

    async def user_state(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await super().user_state(*args, **kwargs)


async def test_a_call_whose_deadline_has_passed_starts_no_channel(quick_store: ModelStore) -> None:
    from recsys.errors import DeadlineExpired
    from services.recall.engine import RecallQuery

    store = SlowStore()
    app = RecallApp(
        RecallSettings(store=str(quick_store.path), port=0, metrics_port=None, feature_store_timeout_ms=500),
        features=store,
    )
    host = GrpcHost(app, app.settings)
    await host.start()
    try:
        async with asyncio.timeout(30):
            while not host.readiness.serving:
                await asyncio.sleep(0.05)
        engine = app.engine
        channels = ("itemcf", "swing", "ease", "two_tower")
        runs_before = [engine._metrics.outcome[name, "ok"]._value.get() for name in channels]
        expired_before = _expired("recall", "user_state")
        with pytest.raises(DeadlineExpired):
            await engine.recall(RecallQuery(user_id="196", time_remaining=0.0))
        assert _expired("recall", "user_state") == expired_before + 1
        # The feature-store read outlives the call's deadline: no channel starts after it.
        store.delay = 0.08
        expired_before = _expired("recall", "channels")
        with pytest.raises(DeadlineExpired):
            await engine.recall(RecallQuery(user_id="196", time_remaining=0.05))
        assert _expired("recall", "channels") == expired_before + 1
        assert [engine._metrics.outcome[name, "ok"]._value.get() for name in channels] == runs_before
        # With time left the same call is answered by its channels.
        store.delay = 0.0
        result = await engine.recall(RecallQuery(user_id="196", time_remaining=1.0))
        assert len(result.merged.items) > 0
        assert [engine._metrics.outcome[name, "ok"]._value.get() for name in channels] != runs_before
    finally:
        await host.stop(grace=0)


async def test_the_answer_carries_the_history_it_read_for_rank(recall: Running) -> None:
    model = recall.model
    response = await recall.stub.Recall(recall_pb2.RecallRequest(user_id="196"), timeout=2)
    assert response.HasField("history")
    stored = np.asarray(model.core.history.items.row(model.user_lookup["196"])).tolist()
    length = model.spec.history_length
    assert list(response.history.item_indexes) == stored[-length:]
    assert len(response.history.liked) == len(response.history.item_indexes)


async def test_the_blocklist_is_applied_in_recall_and_reloaded_when_its_file_changes(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("")
    running = await start(str(quick_store.path), blocklist_file=blocklist, blocklist_reload_seconds=0.05)
    try:
        request = recall_pb2.RecallRequest(user_id="196", max_candidates=1000)
        before = await running.stub.Recall(request, timeout=2)
        model = running.model
        item_ids = model.core.catalogue.item_ids
        # The best items of several channels, and more than recall accepts as exclusions.
        top = list(before.item_indexes[:30])
        blocked_ids = [str(item_ids[index]) for index in top] + [f"unknown-{n}" for n in range(20_000)]
        blocklist.write_text("\n".join(blocked_ids) + "\n")
        async with asyncio.timeout(10):
            while set(top) & set((answer := await running.stub.Recall(request, timeout=2)).item_indexes):
                await asyncio.sleep(0.05)
        # Blocked before the quotas are cut: a channel with a long list fills its quota from
        # the rest of it, and none loses more than the blocked items it had.
        assert stats(answer)["two_tower"].count == stats(before)["two_tower"].count
        for name in ("itemcf", "swing", "ease"):
            assert stats(answer)[name].count >= stats(before)[name].count - len(top), name
        assert list(answer.degraded_reasons) == []
        blocklist.write_text("")  # taken off the list: back within a reload
        async with asyncio.timeout(10):
            while not set(top) <= set((await running.stub.Recall(request, timeout=2)).item_indexes):
                await asyncio.sleep(0.05)
    finally:
        await running.channel.close()
        await running.host.stop(grace=0)


async def test_the_two_tower_channel_finds_new_items_by_their_content(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    """Items upserted while serving are embedded by the version's item tower (off the request
    path, at the catalogue poll) into a live index that the two_tower channel searches beside
    the version's with the same user vector: a new film whose metadata matches the user's
    taste comes back (index n_items + ordinal), ranked by its score among the version's items;
    one that does not, a blocked one and, once withdrawn, the matching one never do."""
    from recsys.content import embed_items
    from recsys.serving_model import ALL_CHANNELS
    from tests.recsys.test_content import film

    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("new-blocked\n")
    running = await start(
        str(quick_store.path),
        catalogue_poll_seconds=0.1,
        blocklist_file=blocklist,
        blocklist_reload_seconds=0.05,
    )
    try:
        model = running.model
        n_items = model.core.catalogue.n_items
        quotas = {**dict.fromkeys(ALL_CHANNELS, 0), "two_tower": 100}
        request = recall_pb2.RecallRequest(user_id="196", max_candidates=1000, quotas=quotas)
        before = await running.stub.Recall(request, timeout=2)
        assert max(before.item_indexes) < n_items
        user = np.asarray(before.user_embedding, dtype=np.float32)
        # The user's best and worst match among new films with the metadata of the version's.
        copies = [film(model, index, f"copy-{index}") for index in range(n_items)]
        scores = embed_items(model, copies) @ user
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        match = dataclasses.replace(copies[best], item_id="new-match")
        items = [
            match,
            dataclasses.replace(copies[worst], item_id="new-far"),
            dataclasses.replace(match, item_id="new-blocked"),  # the same content, blocked
        ]
        upserted = await running.app.features.upsert_items(items, time.time())
        ordinals = {item.item_id: ordinal for item, (ordinal, _) in zip(items, upserted, strict=True)}
        version = model.version
        async with asyncio.timeout(10):
            while (view := running.app.catalogue.view(version)) is None or view.two_tower_source is None:
                await asyncio.sleep(0.05)
        index = {item_id: n_items + ordinal for item_id, ordinal in ordinals.items()}
        assert view.index("new-match") == index["new-match"]

        after = await running.stub.Recall(request, timeout=2)
        found = channel_items(after, "two_tower")
        assert stats(after)["two_tower"].count == 100
        assert index["new-match"] in found
        assert index["new-far"] not in found
        assert index["new-blocked"] not in found
        assert list(after.degraded_reasons) == []
        # Merged by score: every version item it displaced scored below it.
        match_score = float(embed_items(model, [match])[0] @ user)
        assert match_score == pytest.approx(float(scores[best]), abs=1e-5)
        own = np.asarray(sorted(item for item in found if item < n_items))
        own_scores = np.asarray(model.item_embeddings)[own] @ user
        assert own_scores.min() <= match_score + 1e-5
        displaced = set(channel_items(before, "two_tower")) - found
        assert displaced, "the new item took a place in the list"
        assert (np.asarray(model.item_embeddings)[sorted(displaced)] @ user <= match_score + 1e-5).all()

        await running.app.features.withdraw_items(["new-match"], time.time())
        async with asyncio.timeout(10):
            while index["new-match"] in channel_items(
                await running.stub.Recall(request, timeout=2), "two_tower"
            ):
                await asyncio.sleep(0.05)
        final = await running.stub.Recall(request, timeout=2)
        assert stats(final)["two_tower"].count == 100
        assert not {index["new-match"], index["new-blocked"], index["new-far"]} & channel_items(
            final, "two_tower"
        )
    finally:
        await running.channel.close()
        await running.host.stop(grace=0)
