"""Traffic control for new items (issue 17, cold start): a scene's `new_items` slots, boost
and max_age hold in the answers and in `recsys_gateway_new_item_impressions_total`, on the
real quick MovieLens-100K store with recall, rank and the gateway as real gRPC servers on
loopback, on the embedded feature store and on the real Redis (a key prefix of its own)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from recsys.feature_store import CatalogueItem, InProcessFeatureStore
from recsys.feature_store.push import push_core
from recsys.feature_store.redis_store import RedisFeatureStore
from recsys.store import ModelStore
from recsys.v1 import catalogue_pb2, catalogue_pb2_grpc
from tests.recsys.feature_store import REDIS_URL, delete_prefix, unique_prefix
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack
from tests.services.gateway.test_new_items import favourite_genre, new_book

POLL = 0.3  # the services' catalogue poll interval here (seconds)
WITHIN = POLL + 1.5  # every service has polled a change, laid it out and answered
USER = "196"
COUNT = 20
# The same recall for every scene (the new_items channel on, as by default, with room for
# every new item); only the traffic control differs.
RECALL = {"quotas": {"new_items": 50}, "count": {"default": COUNT, "max": 50}}
SCENES = {
    "scenes": {
        "default": {"rerank": {"method": "mmr", "theta": 0.7, "window": 5}},
        "plain": {**RECALL, "new_items": {"max_age": "1h"}},
        "reserved": {**RECALL, "new_items": {"slots": 2, "max_age": "1h"}},
        "boosted": {
            **RECALL,
            "new_items": {"slots": 2, "max_age": 3600, "boost": 10.0, "boost_half_life_impressions": 10},
        },
        "cold_start": {**RECALL, "new_items": {"slots": 2, "max_age": "1h"}},
    }
}
EXPERIMENTS = {
    "experiments": {
        "cold_start_ab": {
            "salt": "cold-start-test",
            "scenes": ["cold_start"],
            "arms": [
                {"name": "control", "share": 0.5, "overrides": {"new_items": {"slots": 0}}},
                {"name": "treatment", "share": 0.5},
            ],
        }
    }
}
METRIC = "recsys_gateway_new_item_impressions_total"


@pytest.fixture(scope="module")
def fast_catalogue_polls() -> Iterator[None]:
    names = [f"RECSYS_{service}_CATALOGUE_POLL_SECONDS" for service in ("RECALL", "RANK", "GATEWAY")]
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, str(POLL)))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", params=["memory", "redis"])
async def stack(
    request: pytest.FixtureRequest,
    quick_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
    fast_catalogue_polls: None,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"traffic-{request.param}")
    experiments = tmp / "experiments.json"
    experiments.write_text(json.dumps(EXPERIMENTS))
    if request.param == "memory":
        running = await start_stack(
            quick_store, tmp, InProcessFeatureStore(), scenes=SCENES, experiments_file=experiments
        )
        yield running
        await stop_stack(running)
        return
    from recsys.artifacts import load_core

    prefix = unique_prefix()
    features = RedisFeatureStore(REDIS_URL, prefix, read_timeout=1.0, write_timeout=1.0)
    version = quick_store.current()
    assert version is not None
    try:
        await push_core(features, version, load_core(quick_store.version_path(version)))
        running = await start_stack(quick_store, tmp, features, scenes=SCENES, experiments_file=experiments)
        yield running
        await stop_stack(running)
    finally:
        await features.close()
        await delete_prefix(prefix)


async def answer(stack: Stack, scene: str, user_id: str = USER, dry_run: bool = True) -> list[str]:
    response = await stack.recommend(user_id, scene=scene, count=COUNT, dry_run=dry_run)
    assert not response.degraded_reasons
    return [item.item_id for item in response.items]


async def until(stack: Stack, check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (at most a few poll intervals) until `check()` is true."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > 4 * WITHIN:
            pytest.fail(f"{what}: not within {4 * WITHIN} s")
        await asyncio.sleep(0.05)


def shown_metric(scene: str, arm: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"scene": scene, "arm": arm}) or 0.0


async def test_new_item_slots_hold_in_answers_and_metrics(stack: Stack) -> None:
    genre = favourite_genre(stack.model, USER)
    suffix = unique_prefix()[-8:]
    engine = stack.gateway_app.engine
    assert engine.new_item_horizon() == 3600.0  # the scenes with slots poll young items' impressions

    # 1. Only an item upserted two hours ago (older than max_age 1h): served like any other
    # candidate, neither boosted nor reserved; the boosted scene answers as the plain one.
    old = f"old-{suffix}"
    await stack.features.upsert_items(
        [CatalogueItem(old, "An old new film", "", (genre,), "Studio", time.time() - 7200)],
        time.time() - 7200,
    )

    apps = (stack.gateway_app, stack.recall.app, stack.rank.app)

    async def old_known() -> bool:
        return all(app.catalogue.upserted(old) for app in apps)  # type: ignore[attr-defined]

    await until(stack, old_known, "the old item polled")
    await asyncio.sleep(POLL)  # and laid out by every service
    plain = await answer(stack, "plain")
    assert await answer(stack, "boosted") == plain
    assert await answer(stack, "reserved") == plain

    # 2. Four items upserted now, in the user's favourite genre: every answer of a scene with
    # 2 slots holds exactly 2 of them (the cap and the reservation); with a boost of 10 (more
    # than the whole range of rewards) they are the first two.
    fresh = [f"fresh-{suffix}-{n}" for n in range(4)]
    upserted = await catalogue_stub(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(items=[new_book(item, genre) for item in fresh]), timeout=5
    )
    assert upserted.added == 4

    async def fresh_served() -> bool:
        return len(set(fresh) & set(await answer(stack, "plain"))) >= 2

    await until(stack, fresh_served, "the fresh items recalled and ranked")
    await asyncio.sleep(POLL)
    plain = await answer(stack, "plain")
    reserved = await answer(stack, "reserved")
    boosted = await answer(stack, "boosted")
    assert len(reserved) == len(boosted) == COUNT
    assert len(set(fresh) & set(reserved)) == 2, reserved
    assert len(set(fresh) & set(boosted)) == 2, boosted
    assert set(boosted[:2]) <= set(fresh), boosted
    # The plain scene shows what scores put there; the old item is never counted as new.
    assert old not in set(reserved) - set(plain)
    for other in ("1", "405", f"nobody-{suffix}"):
        for scene in ("reserved", "boosted"):
            ids = await answer(stack, scene, user_id=other)
            assert len(set(fresh) & set(ids)) == 2, (scene, other, ids)

    # 3. The metric counts the new items shown in answers that are not dry runs, by scene and
    # arm; the feature store counts the same impressions (what decays the boost).
    before = {arm: shown_metric("cold_start", arm) for arm in ("control", "treatment")}
    before_dry = shown_metric("boosted", "none")
    await answer(stack, "boosted")  # a dry run: not shown to anybody
    assert shown_metric("boosted", "none") == before_dry
    users: dict[str, str] = {}
    cold_start = engine.scenes["cold_start"]
    for n in range(1, 200):
        arm = engine.experiments.resolve(cold_start, str(n)).arm
        users.setdefault(arm, str(n))
        if len(users) == 2:
            break
    impressions_before = await stack.features.item_impressions(fresh)
    shown: dict[str, list[str]] = {}
    for arm, user in users.items():
        response = await stack.recommend(user, scene="cold_start", count=COUNT)
        assert response.arm == arm
        shown[arm] = [item.item_id for item in response.items if item.item_id in fresh]
    assert len(shown["treatment"]) == 2
    for arm in ("control", "treatment"):
        assert shown_metric("cold_start", arm) == before[arm] + len(shown[arm]), (arm, shown[arm])
    await stack.settle()
    impressions_after = await stack.features.item_impressions(fresh)
    expected = [
        count + sum(item in ids for ids in shown.values())
        for item, count in zip(fresh, impressions_before, strict=True)
    ]
    assert impressions_after == expected
    assert await stack.features.item_impressions([old]) == [0]

    # 4. The boost decays with impressions: an item shown 200 times (boost 10 · 2^-20) loses
    # its place at the top to a new item shown less, and the slots still hold.
    top = (await answer(stack, "boosted"))[:2]
    await stack.features.add_item_impressions({top[0]: 200})

    async def decayed() -> bool:
        return top[0] not in (await answer(stack, "boosted"))[:2]

    await until(stack, decayed, "the shown item's boost decayed")
    boosted = await answer(stack, "boosted")
    assert set(boosted[:2]) <= set(fresh) - {top[0]}, boosted
    assert len(set(fresh) & set(boosted)) == 2


def catalogue_stub(stack: Stack) -> catalogue_pb2_grpc.CatalogueServiceAsyncStub:
    return catalogue_pb2_grpc.CatalogueServiceStub(stack.channel)
