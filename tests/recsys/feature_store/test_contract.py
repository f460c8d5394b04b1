"""The feature store contract: one behaviour suite run against every implementation
(in-process, Redis on the real server with a key prefix of its own, and a real three-master
Redis Cluster)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import pytest

from recsys.artifacts import CoreArtifacts
from recsys.feature_store import (
    CatalogueItem,
    CatalogueState,
    ExposureFilterConfig,
    FeatureStore,
    InProcessFeatureStore,
    LiveDataPolicy,
    LiveEvent,
    open_feature_store,
)
from recsys.feature_store.push import push_core
from recsys.feature_store.redis_store import RedisFeatureStore
from tests.recsys.feature_store import REDIS_URL, TINY_HISTORIES, delete_prefix, tiny_core, unique_prefix

NOW = 1_750_000_000.0
DAY = 86_400.0
POLICY = LiveDataPolicy(
    live_max_length=5,
    cache_max_uses=3,
    cache_max_age_seconds=100.0,
    cache_max_items=4,
    exposures=ExposureFilterConfig(capacity=200, error_rate=0.01),
)


@dataclass
class Harness:
    store: FeatureStore
    publish: Callable[[str, CoreArtifacts], Awaitable[object]]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        memory = InProcessFeatureStore(policy=POLICY)

        async def add(version: str, core: CoreArtifacts) -> None:
            memory.add_version(version, core)

        yield Harness(memory, add)
        await memory.close()
        return
    # The cluster: one per test run (tests/conftest.py), every user's keys in a slot of their own.
    url = request.getfixturevalue("redis_cluster").url if request.param == "cluster" else REDIS_URL
    prefix = unique_prefix()
    redis = RedisFeatureStore(url, prefix, policy=POLICY, read_timeout=1.0, write_timeout=1.0)

    async def push(version: str, core: CoreArtifacts) -> None:
        await push_core(redis, version, core, batch=2)

    try:
        yield Harness(redis, push)
    finally:
        await redis.close()
        await delete_prefix(prefix, url)


def event(item: str, time: float, kind: str = "click", value: float = 1.0) -> LiveEvent:
    return LiveEvent(item, kind, value, time, f"evt-{item}-{time}")


# --- version snapshots -----------------------------------------------------------------------
async def test_snapshot_ready_only_after_the_version_is_loaded(harness: Harness) -> None:
    assert not await harness.store.snapshot_ready("v1")
    await harness.publish("v1", tiny_core())
    assert await harness.store.snapshot_ready("v1")
    assert not await harness.store.snapshot_ready("v2")


async def test_known_users_read_the_versions_history_and_region(harness: Harness) -> None:
    core = tiny_core()
    await harness.publish("v1", core)
    for index, user in enumerate(TINY_HISTORIES):
        snapshot = (await harness.store.user_state("v1", user, now=NOW)).snapshot
        np.testing.assert_array_equal(snapshot.items, core.history.items.row(index))
        np.testing.assert_array_equal(snapshot.times, core.history.times.row(index))
        np.testing.assert_array_equal(snapshot.ratings, core.history.ratings.row(index))  # NaN == NaN here
        assert snapshot.items.dtype == np.int32
        assert snapshot.times.dtype == np.int64
        assert snapshot.ratings.dtype == np.float32
        assert snapshot.region == int(core.users.regions[index])
    alice = (await harness.store.user_state("v1", "alice", now=NOW)).snapshot
    assert alice.items.tolist() == [0, 3, 5]  # oldest → newest
    assert alice.region == 1
    carol = (await harness.store.user_state("v1", "carol", now=NOW)).snapshot
    assert len(carol) == 0
    assert carol.region == 2


async def test_unknown_users_and_versions_have_an_empty_snapshot(harness: Harness) -> None:
    await harness.publish("v1", tiny_core())
    for version, user in (("v1", "zed"), ("v1", "dave"), ("v9", "alice")):
        state = await harness.store.user_state(version, user, now=NOW)
        assert len(state.snapshot) == 0
        assert state.snapshot.region == 0
        assert state.live_events == ()
        assert state.cache_items == ()
        assert state.exposure_filter is not None
        assert not state.exposure_filter.contains(["item-0"]).any()


async def test_versions_do_not_mix(harness: Harness) -> None:
    await harness.publish("v1", tiny_core())
    await harness.publish("v2", tiny_core({"alice": [(4, 1_700_000_000, 3.0)], "erin": []}, {"erin": 1}))
    v1 = await harness.store.user_state("v1", "alice", now=NOW)
    v2 = await harness.store.user_state("v2", "alice", now=NOW)
    assert v1.snapshot.items.tolist() == [0, 3, 5]
    assert v2.snapshot.items.tolist() == [4]
    assert v2.snapshot.region == 0
    assert (await harness.store.user_state("v1", "erin", now=NOW)).snapshot.region == 0
    assert (await harness.store.user_state("v2", "erin", now=NOW)).snapshot.region == 1


async def test_users_states_is_user_state_for_each(harness: Harness) -> None:
    await harness.publish("v1", tiny_core())
    await harness.store.append_events("bob", [event("item-9", NOW)])
    states = await harness.store.users_states("v1", ["alice", "zed", "bob"], now=NOW)
    assert [state.snapshot.items.tolist() for state in states] == [[0, 3, 5], [], [2]]
    assert [len(state.live_events) for state in states] == [0, 0, 1]
    assert await harness.store.users_states("v1", [], now=NOW) == []


async def test_delete_version_removes_its_snapshot_and_marker_only(harness: Harness) -> None:
    await harness.publish("v1", tiny_core())
    await harness.publish("v2", tiny_core())
    await harness.store.append_events("alice", [event("item-9", NOW)])
    assert await harness.store.delete_version("v1") > 0
    assert not await harness.store.snapshot_ready("v1")
    assert len((await harness.store.user_state("v1", "alice", now=NOW)).snapshot) == 0
    state = await harness.store.user_state("v2", "alice", now=NOW)
    assert state.snapshot.items.tolist() == [0, 3, 5]
    assert [event.item_id for event in state.live_events] == ["item-9"]  # live data is not versioned
    assert await harness.store.delete_version("v1") == 0


# --- live events -------------------------------------------------------------------------------
async def test_appended_events_read_newest_last_and_capped(harness: Harness) -> None:
    store = harness.store
    await store.append_events("alice", [event("a", NOW + 1), event("b", NOW + 2, "like", 1.0)])
    await store.append_events("alice", [event("c", NOW + 4, "rating", 4.5), event("d", NOW + 3)])
    events = (await store.user_state("v1", "alice", now=NOW)).live_events
    assert [item.item_id for item in events] == ["a", "b", "d", "c"]  # by time
    assert events[-1] == LiveEvent("c", "rating", 4.5, NOW + 4, f"evt-c-{NOW + 4}")
    await store.append_events("alice", [event(name, NOW + 10 + step) for step, name in enumerate("efg")])
    events = (await store.user_state("v1", "alice", now=NOW)).live_events
    assert [item.item_id for item in events] == ["d", "c", "e", "f", "g"]  # live_max_length = 5
    events = (await store.user_state("v1", "alice", now=NOW, live_limit=2)).live_events
    assert [item.item_id for item in events] == ["f", "g"]
    assert (await store.user_state("v1", "alice", now=NOW, live_limit=0)).live_events == ()
    assert (await store.user_state("v1", "bob", now=NOW)).live_events == ()


async def test_an_unknown_users_live_events_are_their_history(harness: Harness) -> None:
    """A user the version has no snapshot of reads an empty snapshot and their live events;
    recall and rank turn the consumed ones on items the version knows into the history."""
    from recsys.stages.query import UserHistory

    core = tiny_core()
    await harness.publish("v1", core)
    await harness.store.append_events(
        "zed",
        [
            event("item-4", NOW + 1),
            event("item-1", NOW + 2, "impression"),
            event("item-9", NOW + 3),  # not in the version
            event("item-2", NOW + 4, "rating", 4.5),
        ],
    )
    state = await harness.store.user_state("v1", "zed", now=NOW)
    assert len(state.snapshot) == 0
    assert state.snapshot.region == 0
    lookup = {str(item): index for index, item in enumerate(core.catalogue.item_ids.tolist())}
    history = UserHistory.from_state(state, lookup, core.like_threshold)
    assert history.items.tolist() == [4, 2]
    assert history.liked.tolist() == [True, True]


async def test_consumed_live_items_leave_out_impressions(harness: Harness) -> None:
    await harness.store.append_events(
        "alice", [event("seen", NOW, "impression"), event("watched", NOW + 1, "consume")]
    )
    state = await harness.store.user_state("v1", "alice", now=NOW)
    assert state.consumed_live_items() == ("watched",)


async def test_mark_events_seen_is_true_once_per_id(harness: Harness) -> None:
    assert await harness.store.mark_events_seen(["e1", "e2"], ttl_seconds=60) == [True, True]
    assert await harness.store.mark_events_seen(["e2", "e3", "e3"], ttl_seconds=60) == [False, True, False]
    assert await harness.store.mark_events_seen([], ttl_seconds=60) == []


async def test_forgotten_event_ids_are_new_again(harness: Harness) -> None:
    assert await harness.store.mark_events_seen(["f1", "f2"], ttl_seconds=60) == [True, True]
    await harness.store.forget_events(["f1", "never-marked"])
    await harness.store.forget_events([])
    assert await harness.store.mark_events_seen(["f1", "f2"], ttl_seconds=60) == [True, False]


# --- exposures -----------------------------------------------------------------------------------
async def test_recorded_exposures_are_in_the_filter(harness: Harness) -> None:
    shown = [f"shown-{index}" for index in range(50)]
    await harness.store.record_exposures("alice", shown[:30], NOW - DAY)
    await harness.store.record_exposures("alice", shown[30:], NOW)
    exposures = (await harness.store.user_state("v1", "alice", now=NOW)).exposure_filter
    assert exposures is not None
    assert exposures.contains(shown).all()
    others = exposures.contains([f"other-{index}" for index in range(2_000)])
    assert others.mean() < 0.05  # about 2 × 1% with two slices
    bob = (await harness.store.user_state("v1", "bob", now=NOW)).exposure_filter
    assert bob is not None
    assert not bob.contains(shown).any()


async def test_exposures_from_eight_days_ago_are_forgotten(harness: Harness) -> None:
    await harness.store.record_exposures("alice", ["old"], NOW - 8 * DAY)
    await harness.store.record_exposures("alice", ["recent"], NOW - 6 * DAY)
    exposures = (await harness.store.user_state("v1", "alice", now=NOW)).exposure_filter
    assert exposures is not None
    assert exposures.contains(["old", "recent"]).tolist() == [False, True]


# --- cache channel ---------------------------------------------------------------------------------
async def test_take_cache_serves_best_first_and_each_item_at_most_max_uses_times(harness: Harness) -> None:
    store = harness.store
    await store.put_cache("alice", [("a", 1.0), ("b", 3.0), ("c", 2.0)], NOW)
    assert (await store.user_state("v1", "alice", now=NOW)).cache_items == (
        ("b", 3.0),
        ("c", 2.0),
        ("a", 1.0),
    )
    served: list[str] = []
    for _ in range(6):
        served += [item for item, _ in await store.take_cache("alice", 2, NOW)]
    # max_uses = 3: b and c in takes 1-3, then a alone in takes 4-6.
    assert served == ["b", "c", "b", "c", "b", "c", "a", "a", "a"]
    assert await store.take_cache("alice", 2, NOW) == []
    assert (await store.user_state("v1", "alice", now=NOW)).cache_items == ()


async def test_take_cache_removes_nothing_it_does_not_return(harness: Harness) -> None:
    store = harness.store
    await store.put_cache("alice", [("a", 0.5), ("b", 0.25)], NOW)
    assert await store.take_cache("alice", 1, NOW) == [("a", 0.5)]
    assert await store.take_cache("alice", 0, NOW) == []
    assert await store.take_cache("alice", 10, NOW) == [("a", 0.5), ("b", 0.25)]
    assert await store.take_cache("bob", 10, NOW) == []


async def test_cache_items_older_than_max_age_are_dropped(harness: Harness) -> None:
    store = harness.store
    await store.put_cache("alice", [("old", 9.0)], NOW - 150)
    await store.put_cache("alice", [("fresh", 1.0)], NOW - 50)
    assert (await store.user_state("v1", "alice", now=NOW)).cache_items == (("fresh", 1.0),)
    assert await store.take_cache("alice", 5, NOW) == [("fresh", 1.0)]
    assert await store.take_cache("alice", 5, NOW + 60) == []  # fresh is now 110 s old


async def test_put_cache_refreshes_score_and_time_but_keeps_uses(harness: Harness) -> None:
    store = harness.store
    await store.put_cache("alice", [("a", 1.0)], NOW)
    await store.take_cache("alice", 1, NOW)
    await store.take_cache("alice", 1, NOW)
    await store.put_cache("alice", [("a", 7.0)], NOW + 90)
    assert await store.take_cache("alice", 1, NOW + 150) == [("a", 7.0)]  # third and last use
    assert await store.take_cache("alice", 1, NOW + 150) == []


async def test_cache_keeps_the_best_max_items(harness: Harness) -> None:
    items = [(f"item-{index}", float(index)) for index in range(7)]
    await harness.store.put_cache("alice", items, NOW)
    cached = (await harness.store.user_state("v1", "alice", now=NOW)).cache_items
    assert cached == tuple(reversed(items[3:]))  # cache_max_items = 4


async def test_cache_scores_keep_full_precision(harness: Harness) -> None:
    await harness.store.put_cache("alice", [("a", math.pi), ("b", 1e-300)], NOW)
    assert await harness.store.take_cache("alice", 2, NOW) == [("a", math.pi), ("b", 1e-300)]


async def test_non_finite_cache_scores_are_refused(harness: Harness) -> None:
    with pytest.raises(ValueError, match="not finite"):
        await harness.store.put_cache("alice", [("a", 1.0), ("b", math.nan)], NOW)
    assert await harness.store.take_cache("alice", 5, NOW) == []


async def test_event_values_and_times_keep_full_precision(harness: Harness) -> None:
    sent = LiveEvent("ü-item", "rating", 0.1, NOW + 0.123456, "évent")
    await harness.store.append_events("alice", [sent])
    (received,) = (await harness.store.user_state("v1", "alice", now=NOW)).live_events
    assert received == sent


async def test_open_feature_store_by_url() -> None:
    assert isinstance(open_feature_store("memory://", policy=POLICY), InProcessFeatureStore)
    redis = open_feature_store(REDIS_URL, prefix="test:unused", policy=POLICY)
    try:
        assert isinstance(redis, RedisFeatureStore)
        assert redis.keys.prefix == "test:unused"
        assert redis.policy is POLICY
    finally:
        await redis.close()


# --- the live catalogue -----------------------------------------------------------------------
def book(item_id: str, **fields: object) -> CatalogueItem:
    values: dict[str, object] = {
        "title": f"The {item_id}",
        "author": "Ursula K. Le Guin",
        "categories": ("fiction", "sf"),
        "publisher": "Ace",
        "published_at": 1_700_000_000.0,
    }
    values.update(fields)
    return CatalogueItem(item_id, **values)  # type: ignore[arg-type]


async def test_an_empty_catalogue_is_revision_zero(harness: Harness) -> None:
    assert await harness.store.catalogue_revision() == 0
    assert await harness.store.catalogue_state() == CatalogueState.empty()


async def test_upserted_items_get_stable_ordinals_and_keep_their_metadata(harness: Harness) -> None:
    first = await harness.store.upsert_items([book("new-a"), book("new-b", author="", categories=())], NOW)
    assert first == [(0, True), (1, True)]
    revision = await harness.store.catalogue_revision()
    assert revision > 0
    # An update keeps the ordinal and replaces the metadata; a new id takes the next ordinal.
    second = await harness.store.upsert_items([book("new-b", title="Revised"), book("new-c")], NOW + 10)
    assert second == [(1, False), (2, True)]
    assert await harness.store.catalogue_revision() > revision
    state = await harness.store.catalogue_state()
    assert state.revision == await harness.store.catalogue_revision()
    assert [(entry.item.item_id, entry.ordinal) for entry in state.items] == [
        ("new-a", 0),
        ("new-b", 1),
        ("new-c", 2),
    ]
    a, b, _ = state.items
    assert a.item == book("new-a")
    assert a.upserted_at == NOW
    assert b.item == book("new-b", title="Revised")
    assert b.upserted_at == NOW + 10
    assert state.withdrawn == frozenset()


async def test_metadata_round_trips_unicode_and_unknown_times(harness: Harness) -> None:
    item = CatalogueItem("ü-1", "Der Zauberberg — “Roman”", "Thomas Mann", ("Roman",), "S. Fischer", None)
    await harness.store.upsert_items([item], NOW)
    (stored,) = (await harness.store.catalogue_state()).items
    assert stored.item == item


async def test_withdrawn_items_stay_withdrawn_until_upserted_again(harness: Harness) -> None:
    await harness.store.upsert_items([book("new-a"), book("new-b")], NOW)
    before = await harness.store.catalogue_revision()
    # A version's own item ("item-3") can be withdrawn too; a repeat says it was already.
    assert await harness.store.withdraw_items(["new-a", "item-3"], NOW + 1) == [True, True]
    assert await harness.store.withdraw_items(["new-a"], NOW + 2) == [False]
    assert await harness.store.catalogue_revision() > before
    state = await harness.store.catalogue_state()
    assert state.withdrawn == {"new-a", "item-3"}
    assert [entry.item.item_id for entry in state.items] == ["new-a", "new-b"]  # the ordinal stays
    assert await harness.store.upsert_items([book("new-a")], NOW + 3) == [(0, False)]
    assert (await harness.store.catalogue_state()).withdrawn == {"item-3"}


async def test_empty_catalogue_calls_change_nothing(harness: Harness) -> None:
    assert await harness.store.upsert_items([], NOW) == []
    assert await harness.store.withdraw_items([], NOW) == []
    assert await harness.store.catalogue_revision() == 0


async def test_concurrent_upserts_of_one_new_id_give_it_one_ordinal(harness: Harness) -> None:
    import asyncio

    results = await asyncio.gather(*[harness.store.upsert_items([book("same")], NOW) for _ in range(8)])
    assert {ordinal for ((ordinal, _),) in results} == {0}
    assert sum(new for ((_, new),) in results) == 1
    assert len((await harness.store.catalogue_state()).items) == 1


# --- the look-alike channel's engagers -------------------------------------------------------
async def test_each_item_keeps_its_first_distinct_engagers_up_to_the_limit(harness: Harness) -> None:
    store = harness.store
    assert await store.engagers_revision() == 0
    assert await store.engagers() == {}
    assert await store.record_engagers([], limit=3) == 0
    assert await store.engagers_revision() == 0
    added = await store.record_engagers(
        [("new-a", "u1"), ("new-a", "u2"), ("new-b", "ü-9"), ("new-a", "u1")], limit=3
    )
    assert added == 3  # u1's second engagement with new-a is not a new engager
    revision = await store.engagers_revision()
    assert revision > 0
    # new-a is full after u3: u4 and later users are not its first three.
    assert await store.record_engagers([("new-a", "u3"), ("new-a", "u4"), ("new-b", "42")], limit=3) == 2
    assert await store.engagers() == {"new-a": ("u1", "u2", "u3"), "new-b": ("ü-9", "42")}
    moved = await store.engagers_revision()
    assert moved > revision
    # Nothing new (a repeat, a full item): the revision stays, so pollers rebuild nothing.
    assert await store.record_engagers([("new-a", "u2"), ("new-a", "u5")], limit=3) == 0
    assert await store.engagers_revision() == moved
    with pytest.raises(ValueError, match="limit"):
        await store.record_engagers([("new-a", "u6")], limit=0)


async def test_concurrent_engagers_never_overfill_an_item(harness: Harness) -> None:
    import asyncio

    added = await asyncio.gather(
        *[harness.store.record_engagers([("hot", f"user-{n}")], limit=5) for n in range(12)]
    )
    assert sum(added) == 5
    (users,) = (await harness.store.engagers()).values()
    assert len(users) == 5
    assert len(set(users)) == 5


async def test_item_impressions_add_up_for_catalogue_items_only(harness: Harness) -> None:
    await harness.store.upsert_items([book("new-a"), book("new-b")], NOW)
    assert await harness.store.item_impressions(["new-a", "new-b", "item-3"]) == [0, 0, 0]
    await harness.store.add_item_impressions({"new-a": 2, "new-b": 1})
    await harness.store.add_item_impressions({"new-a": 3, "item-3": 5, "never-upserted": 7})
    # Ids outside the live catalogue (a version's own, unknown ones) are not counted: the
    # counts stay bounded by the catalogue, whatever the callers send.
    assert await harness.store.item_impressions(["new-a", "new-b", "item-3", "never-upserted"]) == [
        5,
        1,
        0,
        0,
    ]
    # Counting is not a catalogue change: services need not re-read the catalogue for it.
    revision = await harness.store.catalogue_revision()
    await harness.store.add_item_impressions({"new-b": 1})
    assert await harness.store.catalogue_revision() == revision
    assert await harness.store.item_impressions(["new-b"]) == [2]
    await harness.store.add_item_impressions({})
    assert await harness.store.item_impressions([]) == []


async def test_concurrent_impression_counts_are_not_lost(harness: Harness) -> None:
    import asyncio

    await harness.store.upsert_items([book("new-a")], NOW)
    await asyncio.gather(*[harness.store.add_item_impressions({"new-a": 1}) for _ in range(20)])
    assert await harness.store.item_impressions(["new-a"]) == [20]
