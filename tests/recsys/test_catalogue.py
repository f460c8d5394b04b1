"""The live catalogue as a model version serves it (`recsys.catalogue`) and the new_items
channel (`NewItemSource`), on a tiny version and the embedded feature store."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from recsys.artifacts import CoreArtifacts
from recsys.catalogue import CatalogueWatcher, NewItems, VersionVocabulary
from recsys.feature_store import CatalogueItem, FeatureStoreUnavailable, InProcessFeatureStore
from recsys.stages.query import build_query
from tests.recsys.feature_store import tiny_core

NOW = 1_750_000_000.0
DAY = 86_400.0


def core_with_metadata() -> CoreArtifacts:
    """tiny_core's six items with categories (tokens 1 = Fiction, 2 = History) and authors
    (1 = Le Guin, 2 = Beard): alice's items 0, 3, 5 are Le Guin's fiction."""
    core = tiny_core()
    catalogue = dataclasses.replace(
        core.catalogue,
        categories=np.array([[1], [2], [2], [1], [2], [1]], dtype=np.int32),
        category_vocab=np.array(["Fiction", "History"]),
        authors=np.array([1, 2, 2, 1, 2, 1], dtype=np.int32),
        author_vocab=np.array(["Ursula K. Le Guin", "Mary Beard"]),
    )
    return dataclasses.replace(core, catalogue=catalogue)


def model_of(core: CoreArtifacts) -> Any:
    lookup = {str(item): index for index, item in enumerate(core.catalogue.item_ids.tolist())}
    return SimpleNamespace(core=core, item_lookup=lookup)


def book(
    item_id: str, author: str = "", categories: tuple[str, ...] = (), days_old: float = 1.0
) -> CatalogueItem:
    return CatalogueItem(item_id, f"Title of {item_id}", author, categories, "", NOW - days_old * DAY)


async def test_new_items_take_indexes_beside_the_versions_own_and_its_vocabulary() -> None:
    store = InProcessFeatureStore()
    core = core_with_metadata()
    await store.upsert_items(
        [
            book("new-a", "ursula k. le guin ", ("FICTION", "Poetry"), days_old=3),
            book("item-2", "Mary Beard"),  # the version's own: keeps index 2
            book("new-b", "Somebody New", ("History",), days_old=1),
        ],
        NOW,
    )
    model = model_of(core)
    view = NewItems(
        "v1",
        1,
        6,
        model.item_lookup,
        VersionVocabulary.of(core.catalogue),
        await store.catalogue_state(),
        NOW,
    )
    assert view.index("new-a") == 6 + 0
    assert view.index("item-2") == 2
    assert view.index("new-b") == 6 + 2  # ordinal 2: ordinals are the store's, gaps and all
    assert view.index("nobody") is None
    assert view.servable.tolist() == [8, 6]  # newest first
    assert view.item_id(6) == "new-a"
    assert view.title(8) == "Title of new-b"
    assert view.item_id(7) == ""  # item-2's ordinal: the version serves it as its own
    # Tokens of the version's vocabularies, case-folded; names it never saw are token 0.
    assert view.authors[0] == 1
    assert view.categories[0].tolist() == [1]  # Poetry is unknown; one column, as the version has
    assert view.authors[2] == 0
    assert view.categories[2].tolist() == [2]
    assert view.is_new(np.array([0, 5, 6, 7, 8, 9])).tolist() == [False, False, True, False, True, False]
    assert view.servable_mask(np.array([0, 5, 6, 7, 8, 9])).tolist() == [True, True, True, False, True, False]
    rows = view.gather(np.asarray(core.catalogue.authors), view.authors, np.array([3, 6, 8, 42]))
    assert rows.tolist() == [1, 1, 0, 0]


async def test_withdrawn_items_of_either_kind_are_not_servable() -> None:
    store = InProcessFeatureStore()
    core = core_with_metadata()
    await store.upsert_items([book("new-a"), book("new-b")], NOW)
    await store.withdraw_items(["new-a", "item-4", "never-heard-of"], NOW)
    model = model_of(core)
    view = NewItems(
        "v1",
        2,
        6,
        model.item_lookup,
        VersionVocabulary.of(core.catalogue),
        await store.catalogue_state(),
        NOW,
    )
    assert view.withdrawn.tolist() == [4, 6]
    assert view.servable.tolist() == [7]
    assert view.servable_mask(np.array([3, 4, 6, 7])).tolist() == [True, False, False, True]


async def test_the_watcher_serves_nothing_until_something_is_upserted_and_follows_changes() -> None:
    store = InProcessFeatureStore()
    core = core_with_metadata()
    prepared: list[int] = []
    watcher = CatalogueWatcher(
        store, lambda: [("v1", model_of(core))], 0.1, prepare=lambda _, view: prepared.append(view.revision)
    )
    assert not await watcher.poll()
    assert watcher.view("v1") is None  # an empty catalogue: requests do nothing
    await store.upsert_items([book("new-a")], NOW)
    assert await watcher.poll()
    view = watcher.view("v1")
    assert view is not None
    assert view.servable.tolist() == [6]
    assert watcher.known_item("new-a", "v1")
    assert watcher.upserted("new-a")
    assert not await watcher.poll()  # nothing changed: nothing rebuilt
    assert prepared == [1]
    await store.withdraw_items(["new-a"], NOW)
    assert await watcher.poll()
    view = watcher.view("v1")
    assert view is not None  # something withdrawn is still something to do
    assert len(view) == 0
    assert view.withdrawn.tolist() == [6]
    assert not watcher.known_item("new-a", "v1")
    assert watcher.view("v2") is None


async def test_the_watcher_lays_the_catalogue_out_for_a_version_that_appears() -> None:
    store = InProcessFeatureStore()
    versions: list[tuple[str, Any]] = [("v1", model_of(core_with_metadata()))]
    watcher = CatalogueWatcher(store, lambda: versions, 0.1)
    await store.upsert_items([book("new-a")], NOW)
    await watcher.poll()
    bigger = dataclasses.replace(tiny_core(n_items=9))
    versions.append(("v2", model_of(bigger)))
    assert await watcher.poll()  # same revision, a new version: laid out for it too
    v1, v2 = watcher.view("v1"), watcher.view("v2")
    assert v1 is not None
    assert v2 is not None
    assert v1.index("new-a") == 6
    assert v2.index("new-a") == 9


async def test_the_new_items_channel_puts_the_users_authors_and_categories_first_newest_first() -> None:
    store = InProcessFeatureStore()
    core = core_with_metadata()
    await store.upsert_items(
        [
            book("old-le-guin", "Ursula K. Le Guin", days_old=30),
            book("new-unrelated", "Somebody", ("Cooking",), days_old=0.1),
            book("fiction", "Somebody Else", ("Fiction",), days_old=2),
            book("history", "Another", ("History",), days_old=1),
            book("consumed", "Ursula K. Le Guin", days_old=0.5),
        ],
        NOW,
    )
    model = model_of(core)
    view = NewItems(
        "v1",
        1,
        6,
        model.item_lookup,
        VersionVocabulary.of(core.catalogue),
        await store.catalogue_state(),
        NOW,
    )
    source = view.new_item_source(np.asarray(core.catalogue.categories), clock=lambda: NOW)
    alice = build_query(core, 0, extra_excluded=np.array([view.index("consumed")], dtype=np.int64))
    found = source.candidates(alice, 10)
    ids = [view.item_id(int(item)) for item in found.items]
    # Alice reads Le Guin's fiction: the fiction and Le Guin's old book first (newest first),
    # then everything else newest first; what she consumed never.
    assert ids == ["fiction", "old-le-guin", "new-unrelated", "history"]
    assert (found.scores > 0).all()
    assert np.isfinite(found.scores).all()
    # A user with no history gets every new item, newest first.
    nobody = build_query(core, -1)
    assert [view.item_id(int(item)) for item in source.candidates(nobody, 3).items] == [
        "new-unrelated",
        "consumed",
        "history",
    ]
    assert len(source.candidates(alice, 0)) == 0


class FlakyStore(InProcessFeatureStore):
    """The embedded store, whose catalogue reads fail while `down` (Redis gone)."""

    down = False

    async def catalogue_revision(self) -> int:
        if self.down:
            raise FeatureStoreUnavailable("down for the test")
        return await super().catalogue_revision()


async def test_a_failed_poll_keeps_the_last_views_and_is_reported() -> None:
    store = FlakyStore()
    core = core_with_metadata()
    polls: list[bool] = []
    watcher = CatalogueWatcher(
        store, lambda: [("v1", model_of(core))], 0.02, on_poll=lambda _, succeeded: polls.append(succeeded)
    )
    await store.upsert_items([book("new-a")], NOW)
    await watcher.start()
    try:
        async with asyncio.timeout(5):
            while watcher.view("v1") is None:
                await asyncio.sleep(0.01)
            store.down = True
            await store.withdraw_items(["new-a"], NOW)  # made while this process cannot see it
            while polls.count(False) < 2:
                await asyncio.sleep(0.01)
            view = watcher.view("v1")
            assert view is not None
            assert view.servable.tolist() == [6]  # still served: the last good view
            assert watcher.failures >= 2
            store.down = False
            while (view := watcher.view("v1")) is not None and len(view):
                await asyncio.sleep(0.01)
    finally:
        await watcher.stop()
    assert polls[0] is True
    assert polls[-1] is True


# -- what new-item traffic control reads ----------------------------------------------------------
async def test_upserted_within_is_measured_from_the_latest_upsert() -> None:
    store = InProcessFeatureStore()
    await store.upsert_items([book("new-old")], NOW - 2 * DAY)
    await store.upsert_items([book("new-young", days_old=30)], NOW - 0.5 * DAY)  # published long ago
    watcher = CatalogueWatcher(store, lambda: [("v1", model_of(core_with_metadata()))], 0.1)
    await watcher.poll()
    view = watcher.view("v1")
    assert view is not None
    indexes = np.array([2, 6, 7, 99])  # the version's own, new-old, new-young, nobody
    assert view.upserted_within(indexes, DAY, NOW).tolist() == [False, False, True, False]
    assert view.upserted_within(indexes, 3 * DAY, NOW).tolist() == [False, True, True, False]
    await store.upsert_items([book("new-old")], NOW - 60)  # upserted again: young again
    await watcher.poll()
    view = watcher.view("v1")
    assert view is not None
    assert view.upserted_within(indexes, DAY, NOW).tolist() == [False, True, True, False]


async def test_the_watcher_polls_the_impressions_of_young_items_only() -> None:
    store = InProcessFeatureStore()
    await store.upsert_items([book("new-old")], NOW - 2 * DAY)
    await store.upsert_items([book("new-young"), book("new-gone")], NOW - 0.5 * DAY)
    await store.withdraw_items(["new-gone"], NOW)
    await store.add_item_impressions({"new-old": 5, "new-young": 3, "new-gone": 4})
    horizon = [DAY]
    read: list[list[str]] = []

    original = store.item_impressions

    async def recording(item_ids: Any) -> list[int]:
        read.append(list(item_ids))
        return await original(item_ids)

    store.item_impressions = recording  # type: ignore[method-assign]
    watcher = CatalogueWatcher(
        store,
        lambda: [("v1", model_of(core_with_metadata()))],
        0.1,
        impressions_horizon=lambda: horizon[0],
        clock=lambda: NOW,
    )
    await watcher.poll()
    # Ordinals 0, 1, 2: too old, young, withdrawn; 3 and -1: no such item.
    assert watcher.impressions(np.array([0, 1, 2, 3, -1])).tolist() == [0, 3, 0, 0, 0]
    assert read == [["new-young"]]
    # Counts move without a catalogue change: every poll reads them.
    await store.add_item_impressions({"new-young": 2})
    assert not await watcher.poll()
    assert watcher.impressions(np.array([1])).tolist() == [5]
    horizon[0] = 3 * DAY
    await watcher.poll()
    assert watcher.impressions(np.array([0, 1])).tolist() == [5, 5]
    horizon[0] = 0.0  # no scene has traffic control on: nothing is read
    await watcher.poll()
    assert watcher.impressions(np.array([0, 1])).tolist() == [0, 0]
    assert len(read) == 3


class ImpressionsDown(InProcessFeatureStore):
    down = False

    async def item_impressions(self, item_ids: Any) -> list[int]:
        if self.down:
            raise FeatureStoreUnavailable("down for the test")
        return await super().item_impressions(item_ids)


async def test_a_failed_impressions_read_keeps_the_last_counts() -> None:
    store = ImpressionsDown()
    await store.upsert_items([book("new-a")], NOW)
    await store.add_item_impressions({"new-a": 7})
    watcher = CatalogueWatcher(
        store,
        lambda: [("v1", model_of(core_with_metadata()))],
        0.1,
        impressions_horizon=lambda: DAY,
        clock=lambda: NOW,
    )
    await watcher.poll()
    store.down = True
    await store.add_item_impressions({"new-a": 1})
    with pytest.raises(FeatureStoreUnavailable):  # the watcher's loop logs and counts it
        await watcher.poll()
    assert watcher.impressions(np.array([0])).tolist() == [7]
    assert watcher.view("v1") is not None
